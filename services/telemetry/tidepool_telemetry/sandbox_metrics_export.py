"""Sandbox telemetry to the organization's OTLP endpoint (feature inventory §10 A, "Sandbox telemetry").

Once an organization has an endpoint (`PUT …/otel-config`), each of its running sandboxes' latest resource
sample (runner -> bus, `SANDBOX_METRICS`) is exported every `interval_seconds` as Daytona's sandbox
metrics: `daytona.sandbox.cpu.utilization` (%), `cpu.limit` (cores), `memory.utilization` (%),
`memory.usage` / `memory.limit` (bytes), `filesystem.utilization` (%), `filesystem.usage` /
`filesystem.available` / `filesystem.total` (bytes). One OTLP resource per sandbox carries
`daytona_organization_id`, `daytona_region_id`, `daytona_snapshot`, `daytona_sandbox_id` and the extra
labels of the sandbox's `DAYTONA_SANDBOX_OTEL_EXTRA_LABELS` env (`team=backend,env=staging`).

One exporter per destination and one export call per organization and round, whatever the number of
sandboxes (the OTLP request carries a resource per sandbox): thousands of sandboxes cost no thread each.
A sample older than two rounds is not exported again (the sandbox stopped or its runner is gone).

Destinations are exported to at once (at most `max_concurrent_exports` threads), each within
`export_timeout_seconds`: a dead endpoint delays no other organization. One whose export is still running
from an earlier round is skipped until it ends (its exporter is not called twice at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from tidepool_contracts.models import DesiredSandbox, SandboxMetricsSample
from tidepool_telemetry.organization_metrics import Destination, otlp_exporter
from tidepool_telemetry.samples import metric_value

log = structlog.get_logger("tidepool.telemetry.sandboxes")

EXTRA_LABELS_ENV = "DAYTONA_SANDBOX_OTEL_EXTRA_LABELS"
MAX_EXTRA_LABELS = 32
# Name, unit (UCUM as OpenTelemetry writes it), description: Daytona's list, in its order.
SANDBOX_METRICS = (
    ("daytona.sandbox.cpu.utilization", "%", "CPU used, % of the sandbox's CPU limit"),
    ("daytona.sandbox.cpu.limit", "{core}", "The sandbox's CPU limit"),
    ("daytona.sandbox.memory.utilization", "%", "Memory used, % of the limit"),
    ("daytona.sandbox.memory.usage", "By", "Memory used"),
    ("daytona.sandbox.memory.limit", "By", "The sandbox's memory limit"),
    ("daytona.sandbox.filesystem.utilization", "%", "Disk used, % of the disk"),
    ("daytona.sandbox.filesystem.usage", "By", "Disk used"),
    ("daytona.sandbox.filesystem.available", "By", "Disk free"),
    ("daytona.sandbox.filesystem.total", "By", "The sandbox's disk"),
)
SCOPE = InstrumentationScope("tidepool.telemetry.sandbox")


def extra_labels(env: dict[str, str]) -> dict[str, str]:
    """`k=v,k2=v2` of `DAYTONA_SANDBOX_OTEL_EXTRA_LABELS` as a dict; pieces without `=` or an empty key are
    skipped (a user's typo costs a label, not the sandbox's telemetry); at most 32 labels."""
    labels: dict[str, str] = {}
    for piece in env.get(EXTRA_LABELS_ENV, "").split(","):
        key, separator, value = piece.partition("=")
        if separator and key.strip() and len(labels) < MAX_EXTRA_LABELS:
            labels[key.strip()] = value.strip()
    return labels


@dataclass
class _Sandbox:
    organization_id: str
    resource: Resource
    sample: SandboxMetricsSample | None = None
    received: float = 0.0  # monotonic time of `sample`


@dataclass
class SandboxMetricsExports:
    """Latest sample per sandbox, exported each round to its organization's destinations.

    `destinations(organization_id)`: where the organization's telemetry goes now (its otel-config; the
    operator's endpoint is not one: it receives organization totals, not tenants' sandboxes).
    `export_timeout_seconds`: how long a round waits for one destination (the OTLP exporters' own default
    timeout is 10 s); `max_concurrent_exports`: threads exporting at once."""

    region_id: str
    interval_seconds: float
    destinations: Callable[[str], Iterable[Destination]]
    exporter_factory: Callable[[Destination], MetricExporter] = otlp_exporter
    export_timeout_seconds: float = 10.0
    max_concurrent_exports: int = 32
    _sandboxes: dict[str, _Sandbox] = field(default_factory=dict)
    _exporters: dict[Destination, MetricExporter] = field(default_factory=dict)
    _running: dict[Destination, asyncio.Future[MetricExportResult]] = field(default_factory=dict)
    _threads: ThreadPoolExecutor | None = None

    def apply_desired(self, sandbox_id: str, desired: DesiredSandbox | None) -> None:
        """A sandbox's record (None: destroyed): its organization and resource attributes."""
        if desired is None:
            self._sandboxes.pop(sandbox_id, None)
            return
        spec = desired.spec
        attributes: dict[str, str] = {
            **extra_labels(spec.env),  # never over the platform's own attributes
            "daytona_organization_id": desired.organization_id,
            "daytona_region_id": self.region_id,
            "daytona_snapshot": spec.snapshot or spec.image,
            "daytona_sandbox_id": sandbox_id,
            "service.name": "daytona-sandbox",
        }
        known = self._sandboxes.get(sandbox_id)
        if known is not None and known.resource.attributes == attributes:
            return
        self._sandboxes[sandbox_id] = _Sandbox(
            desired.organization_id,
            Resource(attributes),
            known.sample if known else None,
            known.received if known else 0.0,
        )

    def record(self, sample: SandboxMetricsSample) -> None:
        """A runner's sample; kept when its organization matches the sandbox's record (a sample never crosses
        tenants, even a stale one from a runner that has not heard of a change)."""
        known = self._sandboxes.get(sample.sandbox_id)
        if known is not None and known.organization_id == sample.organization_id:
            known.sample, known.received = sample, time.monotonic()

    def batch(self, organization_id: str, now: float | None = None) -> MetricsData | None:
        """The organization's sandboxes with a fresh sample, one resource each; None when there are none."""
        now = time.monotonic() if now is None else now
        fresh_after = now - 2 * self.interval_seconds
        resources = []
        for known in self._sandboxes.values():
            sample = known.sample
            if known.organization_id != organization_id or sample is None or known.received < fresh_after:
                continue
            at = int(sample.sampled_at.timestamp() * 1e9)
            metrics = []
            for name, unit, description in SANDBOX_METRICS:
                value = metric_value(sample, name)
                if value is not None:
                    point = NumberDataPoint(
                        attributes={}, start_time_unix_nano=at, time_unix_nano=at, value=value
                    )
                    metrics.append(Metric(name, description, unit, Gauge(data_points=[point])))
            if metrics:
                resources.append(ResourceMetrics(known.resource, [ScopeMetrics(SCOPE, metrics, "")], ""))
        return MetricsData(resource_metrics=resources) if resources else None

    async def export_round(self) -> None:
        """One export per organization and destination, the destinations at once (each in a thread: the
        exporters block); returns when each has answered or had `export_timeout_seconds`."""
        organizations = {known.organization_id for known in self._sandboxes.values() if known.sample}
        wanted: set[Destination] = set()
        work: dict[Destination, list[tuple[str, MetricsData]]] = {}
        for organization_id in organizations:
            data = self.batch(organization_id)
            targets = set(self.destinations(organization_id))
            wanted |= targets
            if data is not None:
                for destination in targets:
                    work.setdefault(destination, []).append((organization_id, data))
        await asyncio.gather(
            *(self._export_to(destination, batches) for destination, batches in work.items())
        )
        for destination in set(self._exporters) - wanted - set(self._running):  # endpoints no longer in use
            await asyncio.to_thread(self._exporters.pop(destination).shutdown)

    async def _export_to(self, destination: Destination, batches: list[tuple[str, MetricsData]]) -> None:
        """The organizations' batches for one destination, one after the other, within the time limit."""
        if destination in self._running:
            log.warning("sandbox_metrics.export_still_running", endpoint=destination.endpoint)
            return
        exporter = self._exporters.get(destination)
        if exporter is None:
            try:
                exporter = self._exporters[destination] = self.exporter_factory(destination)
            except Exception as error:  # refused endpoint: its organizations' problem only
                log.warning(
                    "sandbox_metrics.endpoint_refused",
                    organization_ids=sorted(organization_id for organization_id, _ in batches),
                    error=repr(error),
                )
                return
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.max_concurrent_exports, "sandbox-metrics-export")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.export_timeout_seconds
        for organization_id, data in batches:
            running = loop.run_in_executor(self._threads, exporter.export, data)
            try:
                result = await asyncio.wait_for(asyncio.shield(running), max(0.0, deadline - loop.time()))
            except TimeoutError:
                # The thread cannot be stopped: the destination is skipped until its export ends.
                self._running[destination] = running
                running.add_done_callback(lambda _done: self._running.pop(destination, None))
                log.warning(
                    "sandbox_metrics.export_timed_out",
                    organization_id=organization_id,
                    endpoint=destination.endpoint,
                    timeout_seconds=self.export_timeout_seconds,
                )
                return
            except Exception as error:  # the exporter raised: this destination's problem only
                result = MetricExportResult.FAILURE
                log.warning("sandbox_metrics.export_raised", endpoint=destination.endpoint, error=repr(error))
            if result is not MetricExportResult.SUCCESS:
                log.warning(
                    "sandbox_metrics.export_failed",
                    organization_id=organization_id,
                    endpoint=destination.endpoint,
                    sandboxes=len(data.resource_metrics),
                )

    async def run(self, stop: asyncio.Event) -> None:
        """Export every `interval_seconds` until `stop`; a failing round is logged and the next one tries."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_seconds)
            try:
                await self.export_round()
            except Exception as error:
                log.warning("sandbox_metrics.round_failed", error=repr(error))
        for exporter in self._exporters.values():
            await asyncio.to_thread(exporter.shutdown)
        self._exporters.clear()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
