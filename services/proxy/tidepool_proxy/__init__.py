"""Tidepool proxy: authenticates toolbox traffic and relays it to the runner hosting the sandbox."""
