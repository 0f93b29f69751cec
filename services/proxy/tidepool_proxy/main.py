"""Start-up of the proxy: serve the proxy app (app.py; it only reads KV buckets) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from tidepool_proxy.app import STATE_KEY, create_proxy_app
from tidepool_runtime.health import Health, bus_check, serve_health
from tidepool_runtime.settings import ProxySettings

log = structlog.get_logger("tidepool.proxy")


async def main(settings: ProxySettings, stop: asyncio.Event) -> None:
    app = create_proxy_app(settings)

    def bus() -> object:
        state = app.get(STATE_KEY)
        return state.bus if state is not None else None

    # Its own listener: every path on the proxy's port may be a tenant's preview.
    probes = await serve_health(
        Health("proxy", {"nats": bus_check(bus)}), settings.health_host, settings.health_port
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.proxy_host, settings.proxy_port).start()
        log.info("proxy.started", host=settings.proxy_host, port=settings.proxy_port)
        await stop.wait()
    finally:
        await runner.cleanup()
        if probes is not None:
            await probes.cleanup()
