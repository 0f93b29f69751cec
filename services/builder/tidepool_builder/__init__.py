"""Tidepool image builder service."""
