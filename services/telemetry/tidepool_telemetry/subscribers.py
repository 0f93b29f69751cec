"""Every subscriber of the telemetry service on the bus (the map: docs/asyncapi/asyncapi.yaml).

Subscribes: sandbox events, replayed from the start of the stream on every start (counts need no storage).
Answers: the API's queries of a sandbox's resource samples (read from their stream per query, samples.py).
Publishes nothing.
"""

from __future__ import annotations

from tidepool_contracts import channels
from tidepool_contracts.models import SandboxMetricsQuery, SandboxMetricsReply, SandboxStateEvent
from tidepool_runtime.broker import Bus, Registrar, replay_subscriber, reply_subscriber
from tidepool_telemetry import samples
from tidepool_telemetry.counts import SandboxCounts


def register(registrar: Registrar, counts: SandboxCounts, bus: Bus) -> None:
    """`bus`: the service's connected bus, which the metrics queries read the samples stream through."""

    @replay_subscriber(registrar, channels.SANDBOX_EVENTS, service="telemetry")
    async def on_sandbox_state(event: SandboxStateEvent) -> None:
        counts.apply(event)

    @reply_subscriber(registrar, channels.SANDBOX_METRICS_QUERY, queue="telemetry")
    async def on_sandbox_metrics_query(query: SandboxMetricsQuery) -> SandboxMetricsReply:
        return await samples.answer(bus, query)
