"""Process plumbing: a service's settings, logging, tracing, graceful stop; children that die with us."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tidepool_runtime.observability import configure_logging, configure_tracing, serve_prometheus_metrics
from tidepool_runtime.settings import CommonSettings

SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def run_service(
    name: str, main: Callable[[SettingsT, asyncio.Event], Awaitable[None]], settings_type: type[SettingsT]
) -> None:
    """Run `main(settings, stop)` until it returns; `stop` is set on SIGTERM/SIGINT.

    `settings_type` is the service's own settings class: it reads only the environment it needs.
    """
    settings = settings_type()
    configure_logging(name, settings.log_level, settings.log_json)
    configure_tracing(name, settings.otlp_endpoint, settings.tracing_enabled)
    if settings.metrics_port:
        serve_prometheus_metrics(name, settings.metrics_host, settings.metrics_port)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(settings, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner())


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for a child process: it gets SIGTERM when the thread that started it ends (Linux).

    So a launcher that is killed, or a test session that ends without stopping its stack, leaves no
    nats-server or service behind.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
