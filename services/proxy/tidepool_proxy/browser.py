"""What a browser (the dashboard, served by the API on another origin) needs from the toolbox routes.

* CORS: `/toolbox/…` answers any origin with `Access-Control-Allow-Origin: *` and never with credentials.
  That is safe because the toolbox trusts no ambient credential (no cookies): every call carries the key in
  `Authorization` or is a signed URL, which a foreign page cannot get from the browser. Preflights
  (`OPTIONS` with `Access-Control-Request-Method`) are answered here, before authentication, as they carry
  no credentials by design.
* WebSockets: a browser cannot set `Authorization` on a WebSocket, so the key may travel as the subprotocol
  `Tidepool-Bearer~<key>` (as Kubernetes does with `base64url.bearer.authorization.k8s.io.<token>`). The
  proxy reads it, removes it from what it offers upstream, and never selects it: the client must offer
  another subprotocol the daemon selects (the PTY's `X-Daytona-Pty-Exit-Control`), since a browser fails
  a handshake that selects none of what it offered.
"""

from __future__ import annotations

from aiohttp import web

from tidepool_proxy.auth import BEARER_SUBPROTOCOL_PREFIX
from tidepool_proxy.previews import preview_target
from tidepool_runtime.relay import offered_subprotocols

TOOLBOX_PREFIX = "/toolbox/"
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE_SECONDS = 600


def upstream_subprotocols(request: web.Request) -> list[str]:
    """The client's subprotocols less the one that carries its key (which must not reach the runner)."""
    return [p for p in offered_subprotocols(request) if not p.startswith(BEARER_SUBPROTOCOL_PREFIX)]


def is_preflight(request: web.Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def preflight_response(request: web.Request) -> web.Response:
    """204 allowing the method and the headers the browser asks for (no credentials)."""
    headers = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_SECONDS),
    }
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = requested
    return web.Response(status=204, headers=headers)


async def add_toolbox_cors(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every toolbox answer (relayed, error or streamed) to a cross-origin request is
    readable by the page; previews (another host) keep their own CORS rules."""
    if (
        request.path.startswith(TOOLBOX_PREFIX)
        and "Origin" in request.headers
        and preview_target(request) is None
    ):
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Expose-Headers"] = "Content-Disposition, Content-Length"
