"""Previews: `{port}-{sandboxId}.{domain}` and signed `{port}-{token}.{domain}` to a port inside a sandbox.

The host name (or `X-Forwarded-Host`, set by a custom proxy in front) names the sandbox and the port; any
path is the app's own. Who may pass comes from NATS KV mirrors only (`tidepool_previews`,
`tidepool_signed_previews`, API keys), never from a database:

- a public sandbox's ports need nothing, except the reserved ports 22222, 2280 and 33333;
- otherwise `X-Daytona-Preview-Token` (or the `DAYTONA_SANDBOX_AUTH_KEY` query parameter) with the
  sandbox's current token, or `Authorization: Bearer` with an API key of the sandbox's organization, or a
  signed URL's host name (bound to its port, until it expires or is expired);
- no credentials: 401; another organization's key, a wrong token, an unknown sandbox: 404 alike.

The request then goes to the runner hosting the sandbox (`/sandboxes/{id}/ports/{port}/…`), which tunnels it
through the sandbox's daemon to the port on the sandbox's loopback. A stopped sandbox answers 503 (its
container is never reached), a destroyed one 404/410.

Port 22222 is the web terminal (terminal.py), never the app's.

A browser's first visit to a preview page gets a warning page; continuing sets a 24-hour cookie
(`daytona-preview-page-accepted`). `X-Daytona-Skip-Preview-Warning: true`, a custom proxy in front and the
reserved ports skip it.

CORS: a browser origin is echoed (with credentials) only when it is one of the same sandbox's previews; the
proxy never answers `*` with credentials. `X-Daytona-Disable-CORS: true` leaves CORS entirely to the app.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tidepool_contracts.models import PreviewAccess, SandboxRoute, SignedPreview
from tidepool_contracts.permissions import TOOLBOX_PERMISSION
from tidepool_contracts.states import SandboxState
from tidepool_proxy import terminal
from tidepool_proxy.auth import api_key_hash, bearer_token
from tidepool_proxy.terminal import WEB_TERMINAL_PORT
from tidepool_runtime.relay import (
    UpstreamRejectedUpgradeError,
    UpstreamUnreachableError,
    error_response,
    is_websocket_upgrade,
    relay_http,
    relay_websocket,
    upstream_request_headers,
)

if TYPE_CHECKING:
    from tidepool_proxy.app import ProxyState

log = structlog.get_logger("tidepool.proxy.previews")

RESERVED_PORTS = frozenset({22222, 2280, 33333})
SKIP_WARNING_HEADER = "X-Daytona-Skip-Preview-Warning"
WARNING_COOKIE = "daytona-preview-page-accepted"
WARNING_COOKIE_SECONDS = 24 * 3600
WARNING_ACCEPT_QUERY = "DAYTONA_PREVIEW_WARNING_ACCEPTED"
PREVIEW_TOKEN_HEADER = "X-Daytona-Preview-Token"
PREVIEW_TOKEN_QUERY = "DAYTONA_SANDBOX_AUTH_KEY"
DISABLE_CORS_HEADER = "X-Daytona-Disable-CORS"
# Meant for this proxy; the app never sees them.
PROXY_HEADERS = (
    PREVIEW_TOKEN_HEADER,
    DISABLE_CORS_HEADER,
    SKIP_WARNING_HEADER,
    "X-Daytona-Authorization",
)
# `{port}-{rest}` as the first label of the host name; rest: a sandbox id or a signed URL's token.
_LABEL = re.compile(r"^([0-9]{1,5})-([a-z0-9][a-z0-9_-]{0,127})$")
# Signed tokens have no `-`; sandbox ids (UUIDs) do.
_SIGNED_TOKEN = re.compile(r"^[a-z0-9]{16,40}$")
GONE_STATES = frozenset({SandboxState.DESTROYED, SandboxState.DESTROYING})


@dataclass(frozen=True)
class PreviewTarget:
    port: int
    label: str
    host: str


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _label_of(host: str) -> tuple[int, str] | None:
    name = host.strip().lower()
    if name.startswith("["):
        return None
    name = name.rsplit(":", 1)[0] if ":" in name else name
    first, dot, rest = name.partition(".")
    if not dot or not rest:
        return None
    match = _LABEL.match(first)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def preview_target(request: web.Request) -> PreviewTarget | None:
    """The preview this request is for, from `X-Forwarded-Host` (a custom proxy in front) or `Host`."""
    forwarded = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    for host in (forwarded, request.host):
        if host:
            found = _label_of(host)
            if found is not None:
                return PreviewTarget(port=found[0], label=found[1], host=host)
    return None


def _origin_sandbox(origin: str) -> str | None:
    try:
        host = URL(origin).host
    except ValueError:
        return None
    found = _label_of(host or "")
    return found[1] if found is not None else None


def _cors_headers(origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }


def _adjust_cors(origin: str | None, own_origin: bool):  # type: ignore[no-untyped-def]
    def adjust(headers: CIMultiDict[str]) -> None:
        if origin is not None and own_origin:
            for name, value in _cors_headers(origin).items():
                headers[name] = value
        # Never `*` with credentials, whoever set it.
        if headers.get("Access-Control-Allow-Origin", "").strip() == "*":
            headers.popall("Access-Control-Allow-Credentials", None)

    return adjust


def _preflight(request: web.Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def _token_matches(token: str, access: PreviewAccess) -> bool:
    if not access.token_hash:
        return False
    presented = hashlib.sha256(token.encode()).hexdigest()
    return hmac.compare_digest(presented.encode(), access.token_hash.encode())


async def serve_preview(request: web.Request, state: ProxyState, target: PreviewTarget) -> web.StreamResponse:
    port = target.port
    if not 1 <= port <= 65535:
        return error_response(request, 400, "Invalid port")
    if port == WEB_TERMINAL_PORT and (static := terminal.asset(request)) is not None:
        return static
    not_found = f"preview {target.host} not found"
    signed: SignedPreview | None = None
    try:
        if _SIGNED_TOKEN.match(target.label):
            signed = await state.signed_previews.get(hashlib.sha256(target.label.encode()).hexdigest())
            if signed is None or signed.port != port:
                return error_response(request, 404, not_found)
            if signed.expires_at <= datetime.now(UTC):
                return error_response(request, 410, "this signed preview URL has expired")
            sandbox_id = signed.sandbox_id
        else:
            sandbox_id = target.label
        access = await state.previews.get(sandbox_id)
        route = await state.routes.get(sandbox_id)
    except Exception as error:  # NATS unavailable on a cache miss
        log.warning("proxy.preview_lookup_failed", host=target.host, error=str(error))
        return error_response(request, 503, "preview routing is temporarily unavailable")
    if access is None or (signed is not None and signed.organization_id != access.organization_id):
        return error_response(request, 404, not_found)

    disable_cors = _truthy(request.headers.get(DISABLE_CORS_HEADER))
    origin = request.headers.get("Origin")
    own_origin = origin is not None and _origin_sandbox(origin) == sandbox_id
    if _preflight(request) and not disable_cors:
        # Preflights carry no credentials: answered here, for the sandbox's own origins only.
        headers = {"Vary": "Origin"}
        if own_origin and origin is not None:
            headers.update(_cors_headers(origin))
            headers["Access-Control-Allow-Methods"] = request.headers["Access-Control-Request-Method"]
            wanted = request.headers.get("Access-Control-Request-Headers")
            if wanted:
                headers["Access-Control-Allow-Headers"] = wanted
            headers["Access-Control-Max-Age"] = "600"
        return web.Response(status=204, headers=headers)

    consumed: list[str] = []
    if signed is None:
        refusal = await _authorize(request, state, access, port, consumed)
        if refusal is not None:
            # The cached access may predate a change made just now (a warm-pool claim's new owner and token).
            with contextlib.suppress(Exception):
                fresh = await state.previews.refresh(sandbox_id)
                if fresh is not None and fresh != access:
                    access, consumed = fresh, []
                    refusal = await _authorize(request, state, access, port, consumed)
        if refusal is not None:
            status, message = refusal
            return error_response(request, status, not_found if status == 404 else message)

    if route is None:
        return error_response(request, 404, not_found)
    if route.state in GONE_STATES:
        return error_response(request, 410, f"sandbox {sandbox_id} has been deleted")
    if route.state != SandboxState.STARTED:
        return error_response(
            request, 503, f"sandbox {sandbox_id} is {route.state}: start it to reach its previews"
        )
    if request.query.get(WARNING_ACCEPT_QUERY) == "1":
        return _accept_warning(request)
    if _shows_warning(request, port):
        return _warning_page(request)
    if port == WEB_TERMINAL_PORT:
        return await terminal.serve_terminal(
            request, state.runners, state.settings.runner_token, route, consumed
        )
    return await _forward(
        request, state, route, port, consumed, origin if not disable_cors else None, own_origin
    )


def _shows_warning(request: web.Request, port: int) -> bool:
    """A browser's first visit (a page, not an API call) gets the warning page; a custom proxy in front
    (`X-Forwarded-Host`), `X-Daytona-Skip-Preview-Warning: true`, the acceptance cookie and the reserved
    ports skip it."""
    return (
        request.method == "GET"
        and port not in RESERVED_PORTS
        and "text/html" in request.headers.get("Accept", "")
        and "Mozilla" in request.headers.get("User-Agent", "")
        and not _truthy(request.headers.get(SKIP_WARNING_HEADER))
        and "X-Forwarded-Host" not in request.headers
        and request.cookies.get(WARNING_COOKIE) != "true"
    )


def _accept_url(request: web.Request) -> str:
    query = request.rel_url.query.copy()
    query[WARNING_ACCEPT_QUERY] = "1"
    return str(request.rel_url.with_query(query))


def _warning_page(request: web.Request) -> web.Response:
    accept = html.escape(_accept_url(request), quote=True)
    host = html.escape(request.host)
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Preview of a sandbox</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 4em auto;">
<h1>You are about to open a sandbox preview</h1>
<p><strong>{host}</strong> is served by code running in a sandbox, not by this platform. Do not enter
passwords or other secrets unless you trust whoever runs it.</p>
<p><a id="continue" href="{accept}">Continue to the preview</a></p>
<p><small>You will not be asked again for this preview for 24 hours.</small></p>
</body></html>
"""
    return web.Response(
        status=200,
        text=body,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Daytona-Preview-Warning": "true"},
    )


def _accept_warning(request: web.Request) -> web.Response:
    query = request.rel_url.query.copy()
    query.popall(WARNING_ACCEPT_QUERY, None)
    response = web.Response(status=303, headers={"Location": str(request.rel_url.with_query(query))})
    response.set_cookie(
        WARNING_COOKIE, "true", max_age=WARNING_COOKIE_SECONDS, path="/", httponly=True, samesite="Lax"
    )
    return response


async def _authorize(
    request: web.Request, state: ProxyState, access: PreviewAccess, port: int, consumed: list[str]
) -> tuple[int, str] | None:
    """None when the request may pass; else (status, message). Credentials used are noted in `consumed`."""
    if access.public and port not in RESERVED_PORTS:
        return None
    token = bearer_token(request)
    if token is not None:
        record = await state.api_keys.get(api_key_hash(token))
        if record is not None and not record.revoked and _unexpired(record.expires_at):
            consumed.append("Authorization")
            if record.organization_id != access.organization_id:
                return 404, ""
            # As for the toolbox: a key reaches into a sandbox only with write:sandboxes.
            if TOOLBOX_PERMISSION not in record.permissions:
                return 403, f"API key lacks the required permission: {TOOLBOX_PERMISSION}"
            return None
        if request.headers.get(PREVIEW_TOKEN_HEADER) is None:
            return 401, "invalid API key"
    preview_token = request.headers.get(PREVIEW_TOKEN_HEADER) or request.query.get(PREVIEW_TOKEN_QUERY)
    if preview_token:
        return None if _token_matches(preview_token, access) else (404, "")
    return 401, (
        f"this preview is private: send '{PREVIEW_TOKEN_HEADER}: <token>' (from the preview-url endpoint) "
        "or 'Authorization: Bearer <API key>'"
    )


def _unexpired(expires_at: datetime | None) -> bool:
    if expires_at is None:
        return True
    moment = expires_at if expires_at.tzinfo is not None else expires_at.replace(tzinfo=UTC)
    return moment > datetime.now(UTC)


async def _forward(
    request: web.Request,
    state: ProxyState,
    route: SandboxRoute,
    port: int,
    consumed: list[str],
    origin: str | None,
    own_origin: bool,
) -> web.StreamResponse:
    raw_query = request.rel_url.raw_query_string
    if PREVIEW_TOKEN_QUERY in request.rel_url.query:  # a credential: the app never sees it
        query = request.rel_url.query.copy()
        query.popall(PREVIEW_TOKEN_QUERY, None)
        raw_query = URL.build(query=query).raw_query_string
    base = route.runner_url.rstrip("/")
    url = URL(
        f"{base}/sandboxes/{route.sandbox_id}/ports/{port}{request.rel_url.raw_path}"
        f"{'?' + raw_query if raw_query else ''}",
        encoded=True,
    )
    headers = upstream_request_headers(
        request.headers,
        drop=(*PROXY_HEADERS, *consumed),
        extra={
            "X-Daytona-Authorization": f"Bearer {state.settings.runner_token}",
            "X-Forwarded-Host": request.headers.get("X-Forwarded-Host") or request.host,
            "X-Forwarded-Proto": request.headers.get("X-Forwarded-Proto") or request.scheme,
        },
    )
    try:
        if is_websocket_upgrade(request):
            return await relay_websocket(request, state.runners, url, headers)
        return await relay_http(request, state.runners, url, headers, _adjust_cors(origin, own_origin))
    except UpstreamUnreachableError as error:
        log.warning("proxy.runner_unreachable", sandbox_id=route.sandbox_id, error=str(error))
        return error_response(request, 502, "sandbox runner is not reachable")
    except UpstreamRejectedUpgradeError as rejected:
        return error_response(request, rejected.status, f"the app refused the websocket ({rejected.status})")
