"""The organization metrics (feature inventory §10 B), pushed over OTLP to each organization's endpoint and
to the operator's (TIDEPOOL_ORGANIZATION_METRICS_OTLP_ENDPOINT, every organization's).

Six gauges every `organization_metrics_interval_seconds` (60 s by default): `daytona.sandbox.used_cpu`
(cores), `used_ram` (GiB), `used_storage` (GiB) of the organization's sandboxes (`usage.py`), and
`total_cpu`, `total_ram`, `total_storage`, its quotas (from KV `ORGANIZATION_TELEMETRY`). The resource
carries `organization.id`, each point `region.id`. One MeterProvider per (organization, destination): the
resource is per organization, and a destination's failures touch no other.

Destinations follow KV `ORGANIZATION_TELEMETRY` (the API writes it on `PUT …/otel-config`): a change
replaces the organization's providers without a restart. An organization's own OTLP/HTTP endpoint is
reached over `guarded_http` (public addresses, or `TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS`); the operator's
endpoint is trusted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import structlog
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tidepool_contracts.models import OrganizationTelemetry
from tidepool_runtime.netguard import IPNetwork
from tidepool_runtime.sealing import Sealer
from tidepool_telemetry.guarded_http import guarded_session
from tidepool_telemetry.usage import OrganizationUsage

log = structlog.get_logger("tidepool.telemetry.organizations")

GRPC_DEFAULT_PORT = 4317
# Name, unit, description, and what it reads: `used` a field of usage.Usage, `total` one of the
# organization's OrganizationTelemetry record (its quotas).
ORGANIZATION_METRICS = (
    ("daytona.sandbox.used_cpu", "{core}", "Cores of the organization's running sandboxes", "used", "cpu"),
    ("daytona.sandbox.used_ram", "GiBy", "Memory of its running sandboxes (GiB)", "used", "memory_gib"),
    ("daytona.sandbox.used_storage", "GiBy", "Disk of its sandboxes not archived (GiB)", "used", "disk_gib"),
    ("daytona.sandbox.total_cpu", "{core}", "The organization's CPU quota (cores)", "total", "total_cpu"),
    ("daytona.sandbox.total_ram", "GiBy", "Its memory quota (GiB)", "total", "total_memory_gib"),
    ("daytona.sandbox.total_storage", "GiBy", "Its disk quota (GiB)", "total", "total_disk_gib"),
)


@dataclass(frozen=True)
class Destination:
    """An OTLP endpoint (`http(s)://…` OTLP/HTTP base URL, `grpc(s)://host:port` OTLP/gRPC) and headers."""

    endpoint: str
    headers: tuple[tuple[str, str], ...] = ()


def otlp_exporter(destination: Destination, allowed: Sequence[IPNetwork] | None = None) -> MetricExporter:
    """OTLP/HTTP to `{endpoint}/v1/metrics` (as OTEL_EXPORTER_OTLP_ENDPOINT), or OTLP/gRPC (grpc: plain,
    grpcs: TLS; gRPC metadata keys are lowercase). `allowed`: a tenant's endpoint, whose OTLP/HTTP
    connections reach public addresses and these networks only (None: the operator's, trusted). gRPC
    connections are not checked again (the API checked the endpoint when it was saved)."""
    parts = urlsplit(destination.endpoint)
    if parts.scheme in ("grpc", "grpcs"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(
            endpoint=f"{parts.hostname}:{parts.port or GRPC_DEFAULT_PORT}",
            insecure=parts.scheme == "grpc",
            headers=tuple((name.lower(), value) for name, value in destination.headers),
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(
        endpoint=f"{destination.endpoint.rstrip('/')}/v1/metrics",
        headers=dict(destination.headers),
        session=None if allowed is None else guarded_session(allowed),
    )


def build_organization_provider(
    organization_id: str,
    region_id: str,
    usage: OrganizationUsage,
    quota: Callable[[], OrganizationTelemetry | None],
    reader: MetricReader,
) -> MeterProvider:
    """The six gauges of one organization, read by `reader`; `quota()`: its current KV record."""
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": "tidepool-telemetry", "organization.id": organization_id}),
    )
    meter = provider.get_meter("tidepool.telemetry.organization")
    point = {"region.id": region_id}

    def reader_of(source: str, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            if source == "used":
                yield Observation(float(getattr(usage.used(organization_id), field)), point)
            elif (record := quota()) is not None and (total := getattr(record, field)) is not None:
                yield Observation(float(total), point)  # None: unlimited, nothing to report

        return observe

    for name, unit, description, source, field in ORGANIZATION_METRICS:
        meter.create_observable_gauge(
            name, callbacks=[reader_of(source, field)], unit=unit, description=description
        )
    return provider


class OrganizationExports:
    """The organizations' MeterProviders, kept in step with KV `ORGANIZATION_TELEMETRY` (`apply`)."""

    def __init__(
        self,
        usage: OrganizationUsage,
        region_id: str,
        interval_seconds: float,
        operator_endpoint: str,
        opener: Sealer,
        allowed_networks: Sequence[IPNetwork] = (),
    ) -> None:
        """`allowed_networks`: the non-public networks organizations' own endpoints may reach."""
        self._usage = usage
        self._region_id = region_id
        self._interval_millis = int(interval_seconds * 1000)
        self._operator = Destination(operator_endpoint) if operator_endpoint else None
        self._opener = opener
        self._allowed = tuple(allowed_networks)
        self._records: dict[str, OrganizationTelemetry] = {}
        self._providers: dict[tuple[str, Destination], MeterProvider] = {}

    def _destinations(self, record: OrganizationTelemetry) -> set[Destination]:
        wanted = {self._operator} if self._operator else set()
        if record.endpoint:
            headers: dict[str, str] = {}
            if record.headers_sealed:
                try:
                    headers = orjson.loads(self._opener.open(record.headers_sealed))
                except ValueError:  # sealed with another key: say so, never what it holds
                    log.warning("organization.headers_unreadable", organization_id=record.organization_id)
                    return wanted
            wanted.add(Destination(record.endpoint, tuple(sorted(headers.items()))))
        return wanted

    async def apply(self, organization_id: str, record: OrganizationTelemetry | None) -> None:
        """One change of the bucket (None: the organization is gone): start the providers of its new
        destinations, shut those of the old ones down (a last export, off the event loop)."""
        if record is None:
            self._records.pop(organization_id, None)
            wanted: set[Destination] = set()
        else:
            self._records[organization_id] = record
            wanted = self._destinations(record)
        current = {destination for owner, destination in self._providers if owner == organization_id}
        for destination in wanted - current:
            try:
                exporter = otlp_exporter(
                    destination, None if destination == self._operator else self._allowed
                )
            except Exception as error:  # an endpoint the exporter refuses: this one only, the others go on
                log.warning(
                    "organization.endpoint_refused", organization_id=organization_id, error=repr(error)
                )
                continue
            reader = PeriodicExportingMetricReader(exporter, export_interval_millis=self._interval_millis)
            self._providers[(organization_id, destination)] = build_organization_provider(
                organization_id,
                self._region_id,
                self._usage,
                lambda: self._records.get(organization_id),
                reader,
            )
            log.info("organization.exporting", organization_id=organization_id, endpoint=destination.endpoint)
        stale = [self._providers.pop((organization_id, destination)) for destination in current - wanted]
        for provider in stale:
            await asyncio.to_thread(provider.shutdown)

    def organization_destinations(self, organization_id: str) -> set[Destination]:
        """The organization's own destination (its otel-config), without the operator's: where its sandboxes'
        telemetry goes."""
        record = self._records.get(organization_id)
        if record is None:
            return set()
        return self._destinations(record) - ({self._operator} if self._operator else set())

    def endpoints(self, organization_id: str) -> set[str]:
        """The endpoints `organization_id`'s metrics are exported to now."""
        return {destination.endpoint for owner, destination in self._providers if owner == organization_id}

    async def close(self) -> None:
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            await asyncio.to_thread(provider.shutdown)
