"""Start-up of the telemetry service: sandbox counts from the bus (subscribers.py), exported as metrics;
sandbox resource samples kept for the retention period and served to the API (samples.py)."""

from __future__ import annotations

import asyncio

import structlog

from tidepool_contracts.access import TELEMETRY
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.settings import TelemetrySettings
from tidepool_telemetry.counts import SandboxCounts
from tidepool_telemetry.metrics import build_meter_provider, otlp_reader
from tidepool_telemetry.samples import apply_retention
from tidepool_telemetry.subscribers import register

log = structlog.get_logger("tidepool.telemetry")


async def main(settings: TelemetrySettings, stop: asyncio.Event) -> None:
    bus = Bus(create_broker(settings.nats_url, "tidepool-telemetry", **settings.nats_login), access=TELEMETRY)
    await bus.connect()
    await apply_retention(bus, settings.sandbox_metrics_retention_seconds)
    counts = SandboxCounts()
    readers = [otlp_reader(settings.otlp_endpoint)] if settings.otlp_endpoint else []
    provider = build_meter_provider(counts, readers)
    register(bus.broker, counts, bus)
    await bus.start()
    log.info("telemetry.ready", otlp=settings.otlp_endpoint or "disabled")
    await stop.wait()
    await bus.close()
    provider.shutdown()
