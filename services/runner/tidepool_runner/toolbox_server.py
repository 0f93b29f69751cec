"""The runner's HTTP face: `ANY /sandboxes/{id}/toolbox/{path}` relayed to that sandbox's daemon socket.

Only the proxy calls it (shared runner token); user credentials were checked there and are stripped here.
Only the toolbox API's own routes are forwarded (tidepool_contracts.toolbox_routes), over a connection
verified to reach that sandbox's daemon (daemon_connections.py).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import propagate, trace
from yarl import URL

from tidepool_contracts.toolbox_routes import DAEMON_SPAN_HEADER, toolbox_route_status
from tidepool_runner.activity import ActivityRecorder
from tidepool_runner.backend import ToolboxChannel
from tidepool_runner.daemon_connections import DAEMON_BASE_URL
from tidepool_runner.tcp_tunnel import relay_tcp
from tidepool_runtime.admission import Admission, admitted
from tidepool_runtime.observability import tracer_on_behalf_of
from tidepool_runtime.relay import (
    UpstreamRejectedUpgradeError,
    UpstreamUnreachableError,
    error_response,
    is_websocket_upgrade,
    relay_http,
    relay_websocket,
    upstream_request_headers,
)

# Sandbox ids become a directory name on the host: letters, digits, `-`, `_`, `.` and never `..`.
SANDBOX_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Credentials meant for the proxy/runner hop; the daemon never sees them.
CREDENTIAL_HEADERS = ("Authorization", "X-Daytona-Authorization")

MAX_HEADER_FIELD_SIZE = 64 * 1024

DAEMONS_KEY = web.AppKey("daemons", ToolboxChannel)
RUNNER_TOKEN_KEY = web.AppKey("runner_token", str)
ACTIVITY_KEY = web.AppKey("activity", ActivityRecorder)
# Toolbox requests this runner relays at once, over all its sandboxes (tidepool_runtime.admission).
ADMISSION_KEY = web.AppKey("toolbox_admission", Admission)

tracer = trace.get_tracer("tidepool.runner")


def _has_runner_token(request: web.Request, runner_token: str) -> bool:
    expected = f"Bearer {runner_token}".encode()
    for header in CREDENTIAL_HEADERS:
        presented = request.headers.get(header)
        if presented is not None and hmac.compare_digest(presented.encode(), expected):
            return True
    return False


def toolbox_path(request: web.Request, sandbox_id: str) -> str:
    """The raw (percent-encoded) toolbox path of this request, after `/sandboxes/{id}/toolbox`."""
    prefix = f"/sandboxes/{sandbox_id}/toolbox"
    raw_path = request.rel_url.raw_path
    return (raw_path[len(prefix) :] if raw_path.startswith(prefix) else "") or "/"


def daemon_url(request: web.Request, path: str) -> URL:
    """The daemon URL for this request, keeping the path's and the query's raw escaping untouched."""
    query = request.rel_url.raw_query_string
    return URL(f"{DAEMON_BASE_URL}{path}{'?' + query if query else ''}", encoded=True)


def record_daemon_span(path: str, parent: trace.Span) -> Callable[[CIMultiDict[str]], None]:
    """`relay_http`'s header hook: takes the daemon's timing header (DAEMON_SPAN_HEADER) off the response and,
    if the runner's span records, records it as a span of `tidepool-daemon`, child of that span. The daemon
    measured it on the same host clock; it covers the daemon's handling until its response head (not a
    streamed body). The header never reaches the client, traced or not (a caller's own `traceparent`
    reaches the daemon even with tracing off)."""

    def adjust(headers: CIMultiDict[str]) -> None:
        timing = headers.popall(DAEMON_SPAN_HEADER, [])
        if not timing or not parent.is_recording():
            return
        fields = dict(part.partition("=")[::2] for part in timing[0].split(";"))
        if not (fields.get("start", "").isdigit() and fields.get("end", "").isdigit()):
            return
        span = tracer_on_behalf_of("daemon").start_span(
            f"daemon {path}",
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.SERVER,
            start_time=int(fields["start"]),
            attributes={"url.path": path},
        )
        span.end(end_time=int(fields["end"]))

    return adjust


async def relay_toolbox(request: web.Request) -> web.StreamResponse:
    """One span per toolbox request, child of the proxy's (`traceparent`); the daemon gets its context and
    reports its own handling time back (record_daemon_span)."""
    with tracer.start_as_current_span(
        f"runner toolbox {request.method}",
        context=propagate.extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes={"sandbox.id": request.match_info["sandbox_id"], "http.request.method": request.method},
    ) as span:
        response = await _relay_toolbox(request, span)
        span.set_attribute("http.response.status_code", response.status)
        return response


async def _relay_toolbox(request: web.Request, span: trace.Span) -> web.StreamResponse:
    if not _has_runner_token(request, request.app[RUNNER_TOKEN_KEY]):
        return error_response(request, 401, "invalid runner token")
    sandbox_id = request.match_info["sandbox_id"]
    if not SANDBOX_ID_PATTERN.match(sandbox_id):
        return error_response(request, 404, f"sandbox {sandbox_id} not found")
    path = toolbox_path(request, sandbox_id)
    refused = toolbox_route_status(request.method, path)
    if refused is not None:
        return error_response(request, refused, f"the toolbox API has no route {request.method} {path}")
    return await admitted(request.app[ADMISSION_KEY], request, path, lambda: _relay_to_daemon(request, span))


async def _relay_to_daemon(request: web.Request, span: trace.Span) -> web.StreamResponse:
    sandbox_id = request.match_info["sandbox_id"]
    path = toolbox_path(request, sandbox_id)
    activity = request.app.get(ACTIVITY_KEY)
    if activity is not None:
        activity.touch(sandbox_id)
    session = request.app[DAEMONS_KEY].session(sandbox_id)
    url = daemon_url(request, path)
    headers = upstream_request_headers(request.headers, drop=CREDENTIAL_HEADERS)
    if span.is_recording():
        propagate.inject(headers)
    try:
        if is_websocket_upgrade(request):
            return await relay_websocket(request, session, url, headers)
        return await relay_http(request, session, url, headers, adjust_headers=record_daemon_span(path, span))
    except UpstreamUnreachableError:
        return error_response(request, 502, "sandbox toolbox is not reachable")
    except UpstreamRejectedUpgradeError as rejected:
        return error_response(
            request, rejected.status, f"the sandbox toolbox refused the websocket ({rejected.status})"
        )


# Headers of the proxy hop that the app in the sandbox never sees. (The proxy sends the runner token in
# X-Daytona-Authorization for previews: an `Authorization` the proxy did not use is the app's own.)
PREVIEW_DROPPED_HEADERS = ("X-Daytona-Authorization", "X-Daytona-Skip-Last-Activity-Update")


def preview_path(request: web.Request, sandbox_id: str, port: str) -> str:
    """The raw path of a preview request, after `/sandboxes/{id}/ports/{port}`."""
    prefix = f"/sandboxes/{sandbox_id}/ports/{port}"
    raw_path = request.rel_url.raw_path
    return (raw_path[len(prefix) :] if raw_path.startswith(prefix) else "") or "/"


def _sandbox_port(request: web.Request) -> tuple[str, int] | web.Response:
    """(sandbox id, port) of a `/sandboxes/{id}/.../{port}` request from the proxy or the SSH gateway, or
    the error answer (401 without the runner token, 404 for a malformed id, 400 for a bad port)."""
    if not _has_runner_token(request, request.app[RUNNER_TOKEN_KEY]):
        return error_response(request, 401, "invalid runner token")
    sandbox_id = request.match_info["sandbox_id"]
    raw_port = request.match_info["port"]
    if not SANDBOX_ID_PATTERN.match(sandbox_id):
        return error_response(request, 404, f"sandbox {sandbox_id} not found")
    if not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
        return error_response(request, 400, f"invalid port {raw_port}")
    return sandbox_id, int(raw_port)


async def relay_preview(request: web.Request) -> web.StreamResponse:
    """`ANY /sandboxes/{id}/ports/{port}/{path}`: a preview request, sent through a daemon tunnel to that
    port on the sandbox's loopback (daemon_connections.PortTunnelConnector). The proxy authorized it."""
    checked = _sandbox_port(request)
    if isinstance(checked, web.Response):
        return checked
    sandbox_id, port = checked
    raw_port = request.match_info["port"]  # as it stands in the path, for preview_path
    activity = request.app.get(ACTIVITY_KEY)
    skip_activity = request.headers.get("X-Daytona-Skip-Last-Activity-Update", "").lower() in ("1", "true")
    if activity is not None and not skip_activity:
        activity.touch(sandbox_id)
    query = request.rel_url.raw_query_string
    path = preview_path(request, sandbox_id, raw_port)
    url = URL(f"http://localhost:{port}{path}{'?' + query if query else ''}", encoded=True)
    headers = upstream_request_headers(request.headers, drop=PREVIEW_DROPPED_HEADERS)
    session = request.app[DAEMONS_KEY].port_session(sandbox_id, port)
    try:
        if is_websocket_upgrade(request):
            return await relay_websocket(request, session, url, headers)
        return await relay_http(request, session, url, headers)
    except UpstreamUnreachableError:
        return error_response(request, 502, f"nothing answers on port {port} in sandbox {sandbox_id}")
    except UpstreamRejectedUpgradeError as rejected:
        return error_response(
            request, rejected.status, f"the app on port {port} refused the websocket ({rejected.status})"
        )


async def relay_tcp_tunnel(request: web.Request) -> web.StreamResponse:
    """`GET /sandboxes/{id}/tcp/{port}` (WebSocket): a raw stream to a sandbox port (tcp_tunnel.py)."""
    checked = _sandbox_port(request)
    if isinstance(checked, web.Response):
        return checked
    sandbox_id, port = checked
    if not is_websocket_upgrade(request):
        return error_response(request, 400, "a TCP tunnel is a WebSocket")
    activity = request.app.get(ACTIVITY_KEY)
    if activity is not None:
        activity.touch(sandbox_id)
    return await relay_tcp(request, request.app[DAEMONS_KEY], sandbox_id, port)


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_toolbox_app(
    daemons: ToolboxChannel,
    runner_token: str,
    activity: ActivityRecorder | None = None,
    admission: Admission | None = None,
) -> web.Application:
    """`admission`: the runner's toolbox concurrency limit (None: unbounded)."""
    # Bodies are streamed, so client_max_size never applies. Long headers are allowed: a PTY's envs travel
    # base64-encoded inside Sec-WebSocket-Protocol.
    app = web.Application(handler_args={"max_field_size": MAX_HEADER_FIELD_SIZE})
    app[DAEMONS_KEY] = daemons
    app[RUNNER_TOKEN_KEY] = runner_token
    app[ADMISSION_KEY] = admission if admission is not None else Admission(0, hop="runner")
    if activity is not None:
        app[ACTIVITY_KEY] = activity
    app.router.add_get("/health", health)
    app.router.add_route("*", "/sandboxes/{sandbox_id}/toolbox/{path:.*}", relay_toolbox)
    app.router.add_route("*", "/sandboxes/{sandbox_id}/ports/{port}/{path:.*}", relay_preview)
    app.router.add_route("*", "/sandboxes/{sandbox_id}/ports/{port}", relay_preview)
    app.router.add_get("/sandboxes/{sandbox_id}/tcp/{port}", relay_tcp_tunnel)
    return app
