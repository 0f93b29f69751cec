"""The web terminal on port 22222 of every sandbox's preview (`22222-{sandboxId}.{domain}`): an xterm.js page
(vendored: xterm.js 6.0.0 and its fit add-on, MIT, in `terminal/`) whose WebSocket the proxy relays to a
new PTY in the sandbox (the toolbox's `process/pty/create-connect`, through the runner).

Port 22222 is reserved: the page and its socket need the sandbox's preview token (open the page as
`{preview url}/?DAYTONA_SANDBOX_AUTH_KEY=<token>`, the page hands the token on to its socket) or an API key of
the sandbox's organization, even when the sandbox is public (previews.py checks that first). Only the static
files, the same for every sandbox, are served without credentials.
"""

from __future__ import annotations

import asyncio
import secrets
from importlib import resources

import aiohttp
import structlog
from aiohttp import web
from yarl import URL

from tidepool_contracts.models import SandboxRoute
from tidepool_runtime.relay import (
    UpstreamRejectedUpgradeError,
    UpstreamUnreachableError,
    error_response,
    is_websocket_upgrade,
    relay_websocket,
    upstream_request_headers,
)

log = structlog.get_logger("tidepool.proxy.terminal")

WEB_TERMINAL_PORT = 22222
PREFIX = "/__tidepool/terminal/"
SOCKET_PATH = PREFIX + "pty"
EXIT_CONTROL = "X-Daytona-Pty-Exit-Control"
ASSETS = {
    "xterm.js": "text/javascript",
    "addon-fit.js": "text/javascript",
    "terminal.js": "text/javascript",
    "xterm.css": "text/css",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_files: dict[str, bytes] = {}


def _file(name: str) -> bytes:
    if name not in _files:
        _files[name] = resources.files("tidepool_proxy").joinpath("terminal", name).read_bytes()
    return _files[name]


def asset(request: web.Request) -> web.Response | None:
    """A static file of the page (no credentials needed: nothing in them is the sandbox's), else None."""
    path = request.rel_url.path
    if request.method not in ("GET", "HEAD") or not path.startswith(PREFIX):
        return None
    name = path[len(PREFIX) :]
    if name not in ASSETS:
        return None
    return web.Response(
        body=_file(name),
        content_type=ASSETS[name],
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


async def serve_terminal(
    request: web.Request,
    runners: aiohttp.ClientSession,
    runner_token: str,
    route: SandboxRoute,
    consumed: list[str],
) -> web.StreamResponse:
    """The page at `/` and its PTY socket; 404 for anything else (22222 is the terminal's, not the app's)."""
    path = request.rel_url.path
    if path == SOCKET_PATH and is_websocket_upgrade(request):
        return await _relay_pty(request, runners, runner_token, route, consumed)
    if path == "/" and request.method in ("GET", "HEAD"):
        return web.Response(
            body=_file("index.html"),
            content_type="text/html",
            headers={"Cache-Control": "no-store", **SECURITY_HEADERS},
        )
    return error_response(request, 404, f"the web terminal has no page {path}")


async def _relay_pty(
    request: web.Request,
    runners: aiohttp.ClientSession,
    runner_token: str,
    route: SandboxRoute,
    consumed: list[str],
) -> web.StreamResponse:
    session_id = f"web-terminal-{secrets.token_hex(6)}"
    query = {"id": session_id}
    for name in ("cols", "rows"):
        value = request.query.get(name, "")
        if value.isdigit() and 0 < int(value) <= 1000:
            query[name] = value
    url = (
        URL(route.runner_url.rstrip("/"))
        .with_path(f"/sandboxes/{route.sandbox_id}/toolbox/process/pty/create-connect")
        .with_query(query)
    )
    headers = upstream_request_headers(
        request.headers,
        drop=("Authorization", "X-Daytona-Authorization", "X-Daytona-Preview-Token", "Cookie", *consumed),
        extra={"Authorization": f"Bearer {runner_token}", "X-Forwarded-Host": request.host},
    )
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    protocols = [EXIT_CONTROL] if EXIT_CONTROL in offered else []
    try:
        return await relay_websocket(request, runners, url, headers, protocols=protocols)
    except UpstreamUnreachableError:
        return error_response(request, 502, "sandbox runner is not reachable")
    except UpstreamRejectedUpgradeError as rejected:
        message = f"the sandbox refused the terminal ({rejected.status})"
        return error_response(request, rejected.status, message)
    finally:
        # The page is gone: so is its shell, with everything it started (a PTY outlives its clients
        # otherwise). In a task of its own: this handler may be ending by cancellation.
        task = asyncio.create_task(_delete_session(runners, runner_token, route, session_id))
        _deletions.add(task)
        task.add_done_callback(_deletions.discard)


_deletions: set[asyncio.Task[None]] = set()


async def _delete_session(
    runners: aiohttp.ClientSession, runner_token: str, route: SandboxRoute, session_id: str
) -> None:
    url = URL(route.runner_url.rstrip("/")).with_path(
        f"/sandboxes/{route.sandbox_id}/toolbox/process/pty/{session_id}"
    )
    try:
        async with runners.delete(
            url, headers={"Authorization": f"Bearer {runner_token}"}, timeout=aiohttp.ClientTimeout(total=10)
        ) as answer:
            await answer.read()
    except (aiohttp.ClientError, TimeoutError) as error:
        log.warning("proxy.web_terminal_cleanup_failed", sandbox_id=route.sandbox_id, error=str(error))
