"""Tidepool runner: the compute plane of one host (containers, daemon readiness, toolbox forwarding)."""
