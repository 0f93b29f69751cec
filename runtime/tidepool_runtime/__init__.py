"""Shared runtime of Tidepool's services: the broker, settings, relay, observability and process plumbing.

Everything here runs inside a service; nothing here is on the wire (that is `tidepool_contracts`).
"""
