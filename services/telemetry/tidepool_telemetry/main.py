"""Start-up of the telemetry service: sandbox counts and usage from the bus (subscribers.py), exported as
metrics; the organization metrics to each organization's OTLP endpoint (organization_metrics.py), and its
sandboxes' latest samples too (sandbox_metrics_export.py); sandbox resource samples kept for the retention
period and served to the API (samples.py)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from tidepool_contracts import channels
from tidepool_contracts.access import TELEMETRY
from tidepool_contracts.models import DesiredSandbox, OrganizationTelemetry
from tidepool_runtime import sealing
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.health import Health, bus_check, serve_health
from tidepool_runtime.settings import TelemetrySettings
from tidepool_telemetry.counts import SandboxCounts
from tidepool_telemetry.metrics import build_meter_provider, otlp_reader
from tidepool_telemetry.organization_metrics import OrganizationExports, otlp_exporter
from tidepool_telemetry.samples import apply_retention
from tidepool_telemetry.sandbox_metrics_export import SandboxMetricsExports
from tidepool_telemetry.subscribers import register, watch_forever
from tidepool_telemetry.usage import OrganizationUsage

log = structlog.get_logger("tidepool.telemetry")


async def main(settings: TelemetrySettings, stop: asyncio.Event) -> None:
    bus = Bus(
        create_broker(settings.nats_url, "tidepool-telemetry", **settings.nats_login),
        access=TELEMETRY,
        replicas=settings.nats_replicas,
        create_streams=settings.bus_create_streams,
    )
    probes = await serve_health(
        Health("telemetry", {"nats": bus_check(lambda: bus)}), settings.health_host, settings.health_port
    )
    await bus.connect()
    await apply_retention(bus, settings.sandbox_metrics_retention_seconds)
    counts = SandboxCounts()
    usage = OrganizationUsage()
    readers = [otlp_reader(settings.otlp_endpoint)] if settings.otlp_endpoint else []
    provider = build_meter_provider(counts, readers)
    seal_key = sealing.load_seal_key(settings.otel_seal_key, settings.data_dir, sealing.OTEL_HEADERS)
    exports = OrganizationExports(
        usage,
        region_id=settings.runner_region,
        interval_seconds=settings.organization_metrics_interval_seconds,
        operator_endpoint=settings.organization_metrics_otlp_endpoint,
        opener=sealing.Sealer(seal_key, sealing.OTEL_HEADERS),
        allowed_networks=settings.tenant_endpoint_allowed_networks,
    )
    sandbox_exports = SandboxMetricsExports(
        region_id=settings.runner_region,
        interval_seconds=settings.sandbox_metrics_export_interval_seconds,
        destinations=exports.organization_destinations,
        exporter_factory=lambda destination: otlp_exporter(
            destination, settings.tenant_endpoint_allowed_networks
        ),
    )
    register(bus.broker, counts, bus, usage, sandbox_exports)
    await bus.start()

    async def apply_desired(key: str, desired: DesiredSandbox | None) -> None:
        usage.apply_desired(desired)
        sandbox_exports.apply_desired(key, desired)

    watches = [
        asyncio.create_task(watch_forever(await bus.kv(channels.DESIRED), DesiredSandbox, apply_desired)),
        asyncio.create_task(
            watch_forever(await bus.kv(channels.ORGANIZATION_TELEMETRY), OrganizationTelemetry, exports.apply)
        ),
        asyncio.create_task(sandbox_exports.run(stop)),
    ]
    log.info("telemetry.ready", otlp=settings.otlp_endpoint or "disabled")
    await stop.wait()
    for task in watches:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*watches, return_exceptions=True)
    await bus.close()
    await exports.close()
    provider.shutdown()
    if probes is not None:
        await probes.cleanup()
