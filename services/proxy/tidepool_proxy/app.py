"""The proxy's aiohttp application: `ANY /toolbox/{sandbox_id}/{path}` -> authenticate -> route -> runner.

Hot path cost: two dict lookups (key, route) and one pooled keep-alive connection to the runner. Routes and
API keys come from NATS KV mirrors, never from a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from opentelemetry import propagate, trace
from yarl import URL

from tidepool_contracts import channels
from tidepool_contracts.access import PROXY
from tidepool_contracts.models import ApiKeyRecord, PreviewAccess, SandboxRoute, SignedPreview
from tidepool_contracts.permissions import TOOLBOX_PERMISSION
from tidepool_contracts.states import SandboxState
from tidepool_contracts.subjects import KV_API_KEYS, KV_PREVIEWS, KV_ROUTES, KV_SIGNED_PREVIEWS
from tidepool_contracts.toolbox_routes import toolbox_route_status
from tidepool_proxy.auth import (
    AuthenticationError,
    SigningKeys,
    VerificationUnavailableError,
    authenticate,
)
from tidepool_proxy.browser import (
    add_toolbox_cors,
    is_preflight,
    preflight_response,
    upstream_subprotocols,
)
from tidepool_proxy.kv_cache import KvCache
from tidepool_proxy.previews import preview_target, serve_preview
from tidepool_runtime import sealing
from tidepool_runtime.admission import Admission, admitted
from tidepool_runtime.broker import Bus, connect
from tidepool_runtime.relay import (
    SESSION_SKIP_AUTO_HEADERS,
    UpstreamRejectedUpgradeError,
    UpstreamUnreachableError,
    error_response,
    is_websocket_upgrade,
    relay_http,
    relay_websocket,
    upstream_request_headers,
)
from tidepool_runtime.sealing import Sealer, load_seal_key
from tidepool_runtime.settings import ProxySettings

log = structlog.get_logger("tidepool.proxy")
tracer = trace.get_tracer("tidepool.proxy")

# Also what the KV accepts as a key; anything else cannot name a sandbox.
SANDBOX_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# The user's credentials end here; the runner gets the runner token instead.
CREDENTIAL_HEADERS = ("Authorization", "X-Daytona-Authorization")
MAX_HEADER_FIELD_SIZE = 64 * 1024
RUNNER_CONNECTION_LIMIT = 4096
# Below the runner's (aiohttp server) 75 s keep-alive, so we never reuse a connection it is about to close.
RUNNER_KEEPALIVE_SECONDS = 30.0
RUNNER_CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass
class ProxyState:
    settings: ProxySettings
    bus: Bus
    routes: KvCache[SandboxRoute]
    api_keys: KvCache[ApiKeyRecord]
    runners: aiohttp.ClientSession
    previews: KvCache[PreviewAccess]
    signed_previews: KvCache[SignedPreview]
    signing_keys: SigningKeys | None = None


STATE_KEY = web.AppKey("proxy_state", ProxyState)
# Toolbox requests this proxy relays at once (tidepool_runtime.admission); previews are not counted.
ADMISSION_KEY = web.AppKey("toolbox_admission", Admission)


def toolbox_path(request: web.Request, sandbox_id: str) -> str:
    """The raw (percent-encoded) toolbox path of this request, after `/toolbox/{sandboxId}`."""
    prefix = f"/toolbox/{sandbox_id}"
    raw_path = request.rel_url.raw_path
    return (raw_path[len(prefix) :] if raw_path.startswith(prefix) else "") or "/"


def runner_url(request: web.Request, route: SandboxRoute, path: str) -> URL:
    """The runner's toolbox URL for this request; raw escaping of path and query passes through untouched."""
    query = request.rel_url.raw_query_string
    base = route.runner_url.rstrip("/")
    return URL(
        f"{base}/sandboxes/{route.sandbox_id}/toolbox{path}{'?' + query if query else ''}", encoded=True
    )


async def relay_toolbox(request: web.Request) -> web.StreamResponse:
    """One span per toolbox request (child of the caller's `traceparent`, e.g. the SDK's with OTel on); its
    context goes on to the runner, and from there to the daemon."""
    sandbox_id = request.match_info["sandbox_id"]
    with tracer.start_as_current_span(
        f"proxy toolbox {request.method}",
        context=propagate.extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes={"sandbox.id": sandbox_id, "http.request.method": request.method},
    ) as span:
        response = await _relay_toolbox(request)
        span.set_attribute("http.response.status_code", response.status)
        return response


async def _relay_toolbox(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    sandbox_id = request.match_info["sandbox_id"]
    not_found = f"sandbox {sandbox_id} not found"
    if is_preflight(request):
        return preflight_response(request)
    try:
        access = await authenticate(request, sandbox_id, state.api_keys, state.signing_keys)
    except AuthenticationError as error:
        return error_response(request, 401, str(error))
    except VerificationUnavailableError as error:
        log.warning("proxy.signing_key_lookup_failed", sandbox_id=sandbox_id, error=str(error))
        return error_response(request, 503, "signed URL verification is temporarily unavailable")
    # As Daytona's toolbox: every call needs write:sandboxes (see tidepool_contracts.permissions). Checked
    # before the sandbox is looked up, so the 403 says nothing about whether the sandbox exists.
    if access.lacks(TOOLBOX_PERMISSION):
        return error_response(request, 403, f"API key lacks the required permission: {TOOLBOX_PERMISSION}")
    if not SANDBOX_ID_PATTERN.match(sandbox_id):
        return error_response(request, 404, not_found)
    try:
        route = await state.routes.get(sandbox_id)
        if route is not None and not access.allows(sandbox_id, route.organization_id):
            route = await state.routes.refresh(sandbox_id)  # maybe just claimed from the warm pool
    except Exception as error:  # NATS unavailable on a cache miss
        log.warning("proxy.route_lookup_failed", sandbox_id=sandbox_id, error=str(error))
        return error_response(request, 503, "sandbox routing is temporarily unavailable")
    # Another tenant's sandbox is indistinguishable from a missing one.
    if route is None or not access.allows(sandbox_id, route.organization_id):
        return error_response(request, 404, not_found)
    # Only the toolbox API's own routes are forwarded: nothing else of the runner or the daemon is reachable.
    path = toolbox_path(request, sandbox_id)
    refused = toolbox_route_status(request.method, path)
    if refused is not None:
        return error_response(request, refused, f"the toolbox API has no route {request.method} {path}")
    if route.state != SandboxState.STARTED:
        return error_response(request, 409, f"sandbox is not running (state: {route.state})")

    headers = upstream_request_headers(
        request.headers,
        drop=CREDENTIAL_HEADERS,
        extra={"Authorization": f"Bearer {state.settings.runner_token}", "X-Forwarded-Host": request.host},
    )
    propagate.inject(headers)  # this request's span (the caller's own `traceparent` was copied above)
    url = runner_url(request, route, path)
    # Admission last: what is refused above (401/403/404/409) is refused whatever the load.
    return await admitted(
        request.app[ADMISSION_KEY],
        request,
        path,
        lambda: _relay_to_runner(request, state, route, url, headers),
    )


async def _relay_to_runner(
    request: web.Request, state: ProxyState, route: SandboxRoute, url: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    sandbox_id = route.sandbox_id
    try:
        if is_websocket_upgrade(request):
            return await relay_websocket(
                request, state.runners, url, headers, protocols=upstream_subprotocols(request)
            )
        return await relay_http(request, state.runners, url, headers)
    except UpstreamUnreachableError as error:
        log.warning(
            "proxy.runner_unreachable", sandbox_id=sandbox_id, runner=route.runner_id, error=str(error)
        )
        return error_response(request, 502, "sandbox runner is not reachable")
    except UpstreamRejectedUpgradeError as rejected:
        return error_response(
            request, rejected.status, f"the sandbox refused the websocket ({rejected.status})"
        )


@web.middleware
async def previews_by_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request for `{port}-{id}.{domain}` is a preview, whatever its path; anything else is the toolbox."""
    target = preview_target(request)
    if target is None:
        return await handler(request)
    return await serve_preview(request, request.app[STATE_KEY], target)


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def runner_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=RUNNER_CONNECTION_LIMIT, limit_per_host=0, keepalive_timeout=RUNNER_KEEPALIVE_SECONDS
        ),
        # No total or read timeout: execs run as long as their own timeout says, transfers as long as needed.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=RUNNER_CONNECT_TIMEOUT_SECONDS),
        auto_decompress=False,
        skip_auto_headers=SESSION_SKIP_AUTO_HEADERS,
    )


def create_proxy_app(settings: ProxySettings) -> web.Application:
    """The whole proxy as one aiohttp app: its cleanup context connects NATS, mirrors the KV buckets and owns
    the runner connection pool, so `web.run_app` or a test server runs exactly what production runs."""
    app = web.Application(
        handler_args={"max_field_size": MAX_HEADER_FIELD_SIZE}, middlewares=[previews_by_host]
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        bus = await connect(
            settings.nats_url,
            name="tidepool-proxy",
            access=PROXY,
            replicas=settings.nats_replicas,
            create_streams=settings.bus_create_streams,
            **settings.nats_login,
        )
        routes = KvCache(await bus.kv(channels.ROUTES), SandboxRoute, KV_ROUTES)
        api_keys = KvCache(await bus.kv(channels.API_KEYS), ApiKeyRecord, KV_API_KEYS)
        seal_key = load_seal_key(settings.signing_seal_key, settings.data_dir, sealing.SIGNING_KEYS)
        signing_keys = SigningKeys(
            await bus.kv(channels.SIGNING_KEYS), Sealer(seal_key, sealing.SIGNING_KEYS)
        )
        previews = KvCache(await bus.kv(channels.PREVIEWS), PreviewAccess, KV_PREVIEWS)
        signed_previews = KvCache(await bus.kv(channels.SIGNED_PREVIEWS), SignedPreview, KV_SIGNED_PREVIEWS)
        watchers = [
            asyncio.create_task(previews.watch_forever(), name="proxy-previews-watch"),
            asyncio.create_task(signed_previews.watch_forever(), name="proxy-signed-previews-watch"),
            asyncio.create_task(routes.watch_forever(), name="proxy-routes-watch"),
            asyncio.create_task(api_keys.watch_forever(), name="proxy-api-keys-watch"),
            asyncio.create_task(signing_keys.watch_forever(), name="proxy-signing-keys-watch"),
        ]
        app[STATE_KEY] = ProxyState(
            settings=settings,
            bus=bus,
            routes=routes,
            api_keys=api_keys,
            runners=runner_session(),
            previews=previews,
            signed_previews=signed_previews,
            signing_keys=signing_keys,
        )
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()
            for watcher in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await app[STATE_KEY].runners.close()
            await bus.close()

    app[ADMISSION_KEY] = Admission(
        settings.proxy_toolbox_max_in_flight,
        queue_wait=settings.toolbox_queue_wait_seconds,
        queue_length=settings.toolbox_queue_length,
        hold=settings.toolbox_slot_hold_seconds,
        retry_after_seconds=settings.toolbox_retry_after_seconds,
        hop="toolbox proxy",
    )
    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(add_toolbox_cors)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/toolbox/{sandbox_id}/{path:.*}", relay_toolbox)
    return app
