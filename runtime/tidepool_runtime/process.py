"""Process plumbing every service shares: settings, logging, tracing, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from tidepool_runtime.observability import configure_logging, configure_tracing
from tidepool_runtime.settings import Settings, load_settings


def run_service(name: str, main: Callable[[Settings, asyncio.Event], Awaitable[None]]) -> None:
    settings = load_settings()
    configure_logging(name, settings.log_level, settings.log_json)
    configure_tracing(name, settings.otlp_endpoint)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(settings, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner())
