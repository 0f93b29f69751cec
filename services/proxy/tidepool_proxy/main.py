"""Start-up of the proxy: serve the proxy app (app.py; it only reads KV buckets) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from tidepool_proxy.app import create_proxy_app
from tidepool_runtime.settings import ProxySettings

log = structlog.get_logger("tidepool.proxy")


async def main(settings: ProxySettings, stop: asyncio.Event) -> None:
    runner = web.AppRunner(create_proxy_app(settings), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.proxy_host, settings.proxy_port).start()
        log.info("proxy.started", host=settings.proxy_host, port=settings.proxy_port)
        await stop.wait()
    finally:
        await runner.cleanup()
