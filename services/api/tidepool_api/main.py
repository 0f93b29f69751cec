"""Start-up of the API: database, bus (subscribers.py), HTTP server (app.py); stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
import uvicorn
from sqlalchemy import text

from tidepool_api import otel_config
from tidepool_api.app import create_app
from tidepool_api.auth import Authenticator
from tidepool_api.bootstrap import (
    ensure_admin,
    ensure_default_snapshots,
    ensure_warm_pool_organization,
    mirror_api_keys,
)
from tidepool_api.context import ApiContext
from tidepool_api.db import Database
from tidepool_api.http_limits import bounded_http_protocol
from tidepool_api.live_events import SESSION_LIVE, LiveEvents
from tidepool_api.migrate import migrate
from tidepool_api.ratelimit import RateLimiter
from tidepool_api.secrets_box import SecretBox, load_secret_key
from tidepool_api.snapshots import evict_expired_builds_forever
from tidepool_api.subscribers import register
from tidepool_api.warm_pools import refill_forever
from tidepool_api.webhook_delivery import deliver_forever, relay_forever
from tidepool_api.webhooks import SESSION_WAKE
from tidepool_contracts import channels
from tidepool_contracts.access import API
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.health import Health, bus_check
from tidepool_runtime.settings import ApiSettings

log = structlog.get_logger("tidepool.api")


async def main(settings: ApiSettings, stop: asyncio.Event) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await migrate(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    bus = Bus(
        create_broker(settings.nats_url, "tidepool-api", **settings.nats_login),
        access=API,
        replicas=settings.nats_replicas,
        create_streams=settings.bus_create_streams,
    )
    await bus.connect()
    context = ApiContext(
        settings=settings,
        database=database,
        bus=bus,
        desired_kv=await bus.kv(channels.DESIRED),
        api_keys_kv=await bus.kv(channels.API_KEYS),
        authenticator=Authenticator(database),
        secret_box=SecretBox(load_secret_key(settings)),
        organization_telemetry_kv=await bus.kv(channels.ORGANIZATION_TELEMETRY),
        rate_limiter=RateLimiter(database, settings),
    )
    bus.add_publishers(register(bus.broker, context))
    await ensure_admin(context)
    await ensure_warm_pool_organization(context)
    await mirror_api_keys(context)
    await otel_config.mirror_all(context)
    await ensure_default_snapshots(context)
    await bus.start()
    consumers = [
        asyncio.create_task(evict_expired_builds_forever(context)),
        asyncio.create_task(refill_forever(context)),
        asyncio.create_task(relay_forever(context)),
        asyncio.create_task(deliver_forever(context)),
    ]
    live_events = LiveEvents(context.authenticator, settings.toolbox_proxy_url)
    # State writes emit once committed; a commit that recorded a webhook message wakes the outbox relay.
    database.sessions.configure(info={SESSION_LIVE: live_events, SESSION_WAKE: context.webhook_outbox_wake})

    async def database_answers() -> None:
        async with database.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    # Probes on the API's own port, in front of everything (no key needed): tidepool_runtime.health.
    health = Health("api", {"database": database_answers, "nats": bus_check(lambda: bus)})
    health.watch(*consumers)
    config = uvicorn.Config(
        health.asgi(live_events.asgi_app(create_app(context))),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=75,
        http=bounded_http_protocol(settings.api_max_header_bytes),  # 431 for oversized heads (issue #9)
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve())
    log.info("api.listening", url=settings.effective_public_api_url)
    await stop.wait()
    server.should_exit = True
    await serving
    for task in consumers:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*consumers, return_exceptions=True)
    await bus.close()
    await database.close()
