"""Tidepool scheduler: places sandboxes on runners and reconciles desired against actual state."""
