"""Tidepool REST gateway: Daytona-compatible /api, auth, orgs, keys; writes desired state and intents."""
