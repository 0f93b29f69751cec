"""Entry point: `python -m tidepool_telemetry`."""

from __future__ import annotations

import asyncio

import structlog
from nats.js.api import DeliverPolicy

from tidepool_contracts import subjects
from tidepool_contracts.models import SandboxStateEvent
from tidepool_runtime.bus import connect, decode
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import Settings
from tidepool_telemetry.counts import SandboxCounts
from tidepool_telemetry.metrics import build_meter_provider, otlp_reader

log = structlog.get_logger("tidepool.telemetry")


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await connect(settings.nats_url, "tidepool-telemetry")
    counts = SandboxCounts()
    readers = [otlp_reader(settings.otlp_endpoint)] if settings.otlp_endpoint else []
    provider = build_meter_provider(counts, readers)

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        counts.apply(decode(SandboxStateEvent, msg.data))

    # An ordered, ephemeral consumer replays the retained history on every start: counts need no storage.
    subscription = await bus.js.subscribe(
        f"{subjects.EVENT_SANDBOX_PREFIX}.>",
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    log.info("telemetry.ready", otlp=settings.otlp_endpoint or "disabled")
    await stop.wait()
    await subscription.unsubscribe()
    provider.shutdown()
    await bus.close()


if __name__ == "__main__":
    run_service("telemetry", main)
