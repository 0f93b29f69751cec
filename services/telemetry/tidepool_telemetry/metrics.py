"""OpenTelemetry metrics: an observable gauge of sandboxes per organization and state."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tidepool_telemetry.counts import SandboxCounts

SANDBOX_GAUGE = "tidepool.sandboxes"


def build_meter_provider(counts: SandboxCounts, readers: list[MetricReader]) -> MeterProvider:
    provider = MeterProvider(
        metric_readers=readers, resource=Resource.create({"service.name": "tidepool-telemetry"})
    )
    meter = provider.get_meter("tidepool.telemetry")

    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        for (organization, state), count in counts.by_organization_and_state().items():
            yield Observation(count, {"organization.id": organization, "sandbox.state": state})

    meter.create_observable_gauge(
        SANDBOX_GAUGE,
        callbacks=[observe],
        unit="{sandbox}",
        description="Sandboxes per organization and state",
    )
    return provider


def otlp_reader(endpoint: str, interval_seconds: float = 15.0) -> MetricReader:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{endpoint.rstrip('/')}/v1/metrics"),
        export_interval_millis=int(interval_seconds * 1000),
    )
