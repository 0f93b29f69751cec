"""Every subscriber of the telemetry service on the bus (the map: docs/asyncapi/asyncapi.yaml).

Subscribes: sandbox events, replayed from the start of the stream on every start (counts need no storage);
sandbox resource samples as they come (the latest of each is exported to its organization's OTLP endpoint).
Answers: the API's queries of a sandbox's resource samples (read from their stream per query, samples.py).
Watches: KV `DESIRED` (each sandbox's size) and KV `ORGANIZATION_TELEMETRY` (each organization's OTLP
destination and quotas), from their current values on. Publishes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from pydantic import BaseModel

from tidepool_contracts import channels
from tidepool_contracts.models import (
    SandboxMetricsQuery,
    SandboxMetricsReply,
    SandboxMetricsSample,
    SandboxStateEvent,
)
from tidepool_runtime.broker import (
    Bus,
    KeyValue,
    Registrar,
    follow_subscriber,
    kv_watch,
    replay_subscriber,
    reply_subscriber,
)
from tidepool_telemetry import samples
from tidepool_telemetry.counts import SandboxCounts
from tidepool_telemetry.sandbox_metrics_export import SandboxMetricsExports
from tidepool_telemetry.usage import OrganizationUsage

log = structlog.get_logger("tidepool.telemetry")
ModelT = TypeVar("ModelT", bound=BaseModel)
WATCH_RESTART_DELAY_SECONDS = 1.0


def register(
    registrar: Registrar,
    counts: SandboxCounts,
    bus: Bus,
    usage: OrganizationUsage | None = None,
    sandbox_exports: SandboxMetricsExports | None = None,
) -> None:
    """`bus`: the service's connected bus, which the metrics queries read the samples stream through."""

    @replay_subscriber(registrar, channels.SANDBOX_EVENTS, service="telemetry")
    async def on_sandbox_state(event: SandboxStateEvent) -> None:
        counts.apply(event)
        if usage is not None:
            usage.apply_state(event)

    if sandbox_exports is not None:
        exports = sandbox_exports

        @follow_subscriber(registrar, channels.SANDBOX_METRICS, service="telemetry")
        async def on_sandbox_metrics(sample: SandboxMetricsSample) -> None:
            exports.record(sample)

    @reply_subscriber(registrar, channels.SANDBOX_METRICS_QUERY, queue="telemetry")
    async def on_sandbox_metrics_query(query: SandboxMetricsQuery) -> SandboxMetricsReply:
        return await samples.answer(bus, query)


async def watch_forever(
    kv: KeyValue, model_type: type[ModelT], apply: Callable[[str, ModelT | None], Awaitable[None]]
) -> None:
    """`apply(key, value or None when deleted)` for every current entry, then every change; the watch is
    restarted after a failure (it replays the current values, so `apply` must be idempotent)."""
    while True:
        try:
            async for key, value in kv_watch(kv, model_type):
                await apply(key, value)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # reconnects and server restarts: resubscribe
            log.warning("telemetry.watch_failed", model=model_type.__name__, error=str(error))
        await asyncio.sleep(WATCH_RESTART_DELAY_SECONDS)
