"""Tidepool's user-facing clients: the `tidepool` CLI's sandbox/snapshot/volume commands and the MCP server.

A client only: it talks to the REST API through the official `daytona` SDK, never to NATS or the database.
"""
