"""Tidepool toolbox daemon: the in-sandbox HTTP server behind Daytona's toolbox API.

It runs on the sandbox image's own ``python3`` and therefore uses only the standard library.
"""

DAEMON_VERSION = "0.1.0"
