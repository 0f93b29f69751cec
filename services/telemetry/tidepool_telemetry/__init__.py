"""Tidepool telemetry: per-organization sandbox metrics over OTLP, usage metering."""
