"""Tidepool toolbox daemon: the in-sandbox HTTP server behind Daytona's toolbox API.

It runs on its own Python runtime, staged by the runner (tidepool_runner.toolbox_runtime), and therefore
uses only the standard library. `routes.py` lists every route and its handler: the map of the package.
Feature packages: `fs/`, `process/`, `git/`, `lsp/`, over the daemon's own HTTP/WebSocket layer `httpd/`
(not `http`: the standard library's name);
`supervisor.py` and `worker.py` are its two processes.
"""

DAEMON_VERSION = "0.1.0"
