"""Sandbox metrics export (feature inventory §10 A): resources, labels, tenants and freshness, unit level."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from tests.polling import wait_until_async
from tidepool_contracts.models import DesiredSandbox, DesiredState, SandboxMetricsSample, SandboxSpec
from tidepool_telemetry.organization_metrics import Destination
from tidepool_telemetry.sandbox_metrics_export import SandboxMetricsExports, extra_labels


def desired(sandbox_id: str, organization_id: str, env: dict[str, str] | None = None) -> DesiredSandbox:
    spec = SandboxSpec(
        sandbox_id=sandbox_id,
        organization_id=organization_id,
        image="localhost/tidepool/default:1",
        snapshot="daytona-small",
        env=env or {},
    )
    return DesiredSandbox(
        sandbox_id=sandbox_id,
        organization_id=organization_id,
        desired_state=DesiredState.STARTED,
        spec=spec,
        intent_id="i",
    )


def sample(sandbox_id: str, organization_id: str) -> SandboxMetricsSample:
    return SandboxMetricsSample(
        sandbox_id=sandbox_id,
        organization_id=organization_id,
        runner_id="r",
        sampled_at=datetime.now(UTC),
        cpu_utilization=12.5,
        cpu_limit=1,
        memory_usage=256,
        memory_limit=1024,
    )


def exports() -> SandboxMetricsExports:
    return SandboxMetricsExports("us", 10.0, lambda _org: {Destination("http://127.0.0.1:9")})


def test_extra_labels_parse_daytonas_format_and_skip_what_is_malformed() -> None:
    env = {"DAYTONA_SANDBOX_OTEL_EXTRA_LABELS": " team=backend,env = staging,,novalue,=x,k=a=b"}
    assert extra_labels(env) == {"team": "backend", "env": "staging", "k": "a=b"}
    assert extra_labels({}) == {}


def test_one_resource_per_fresh_sandbox_of_the_organization_only() -> None:
    subject = exports()
    subject.apply_desired("a", desired("a", "org-1", {"DAYTONA_SANDBOX_OTEL_EXTRA_LABELS": "team=x"}))
    subject.apply_desired("b", desired("b", "org-2"))
    subject.record(sample("a", "org-1"))
    subject.record(sample("b", "org-2"))
    data = subject.batch("org-1")
    assert data is not None
    (resource,) = data.resource_metrics
    assert dict(resource.resource.attributes) == {
        "team": "x",
        "daytona_organization_id": "org-1",
        "daytona_region_id": "us",
        "daytona_snapshot": "daytona-small",
        "daytona_sandbox_id": "a",
        "service.name": "daytona-sandbox",
    }
    values = {m.name: m.data.data_points[0].value for m in resource.scope_metrics[0].metrics}
    assert values == {
        "daytona.sandbox.cpu.utilization": 12.5,
        "daytona.sandbox.cpu.limit": 1.0,
        "daytona.sandbox.memory.utilization": 25.0,
        "daytona.sandbox.memory.usage": 256.0,
        "daytona.sandbox.memory.limit": 1024.0,
    }


def test_labels_never_override_the_platforms_attributes() -> None:
    subject = exports()
    forged = "daytona_organization_id=org-2,daytona_sandbox_id=b"
    subject.apply_desired("a", desired("a", "org-1", {"DAYTONA_SANDBOX_OTEL_EXTRA_LABELS": forged}))
    subject.record(sample("a", "org-1"))
    data = subject.batch("org-1")
    assert data is not None
    attributes = data.resource_metrics[0].resource.attributes
    assert (attributes["daytona_organization_id"], attributes["daytona_sandbox_id"]) == ("org-1", "a")


def test_a_sample_from_another_tenant_or_an_unknown_or_stale_sandbox_is_not_exported() -> None:
    subject = exports()
    subject.apply_desired("a", desired("a", "org-1"))
    subject.record(sample("a", "org-2"))  # a runner's stale view: never crosses tenants
    subject.record(sample("z", "org-1"))  # no record of it
    assert subject.batch("org-1") is None
    subject.record(sample("a", "org-1"))
    assert subject.batch("org-1") is not None
    assert subject.batch("org-1", now=10**9) is None  # two rounds without a sample: stopped
    subject.apply_desired("a", None)
    assert subject.batch("org-1") is None


class BlockingExporter(MetricExporter):
    """Records its exports; each one waits until `release` is set (at most 30 s, so a test that fails does
    not hang)."""

    def __init__(self, release: threading.Event | None = None) -> None:
        super().__init__()
        self.release = release
        self.started = threading.Event()
        self.calls: list[MetricsData] = []
        self.results: list[MetricExportResult] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **_: object
    ) -> MetricExportResult:
        self.calls.append(metrics_data)
        self.started.set()
        released = self.release is None or self.release.wait(30)
        self.results.append(MetricExportResult.SUCCESS if released else MetricExportResult.FAILURE)
        return self.results[-1]

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **_: object) -> None:
        if self.release is not None:
            self.release.set()


def two_organizations(factory: dict[str, MetricExporter], **options: float) -> SandboxMetricsExports:
    subject = SandboxMetricsExports(
        "us",
        10.0,
        lambda organization_id: {Destination(f"http://{organization_id}.example:4318")},
        exporter_factory=lambda destination: factory[destination.endpoint],
        **options,  # type: ignore[arg-type]
    )
    for sandbox_id, organization_id in (("a", "dead"), ("b", "alive")):
        subject.apply_desired(sandbox_id, desired(sandbox_id, organization_id))
        subject.record(sample(sandbox_id, organization_id))
    return subject


async def test_destinations_are_exported_to_at_once() -> None:
    """Each exporter waits for the other to have started: only exports made at once both succeed (one
    after the other, the first would wait for the second in vain)."""
    first, second = BlockingExporter(), BlockingExporter()
    first.release, second.release = second.started, first.started
    subject = two_organizations({"http://dead.example:4318": first, "http://alive.example:4318": second})
    await subject.export_round()
    assert first.results == second.results == [MetricExportResult.SUCCESS]
    await subject.run(_stopped())


def _stopped() -> asyncio.Event:
    stopped = asyncio.Event()
    stopped.set()
    return stopped


async def test_a_dead_endpoint_delays_no_other_and_is_not_called_again_while_it_hangs() -> None:
    hang = threading.Event()
    dead, alive = BlockingExporter(hang), BlockingExporter()
    subject = two_organizations(
        {"http://dead.example:4318": dead, "http://alive.example:4318": alive}, export_timeout_seconds=0.2
    )
    try:
        await subject.export_round()  # returns although the dead endpoint never answered
        assert len(alive.calls) == 1 and len(dead.calls) == 1
        await subject.export_round()  # the dead one's export still runs: not called again
        assert len(alive.calls) == 2 and len(dead.calls) == 1
    finally:
        hang.set()
    await wait_until_async(lambda: _idle(subject), "the hung export never ended")
    await subject.export_round()  # it ended: exported to again
    assert len(alive.calls) == 3 and len(dead.calls) == 2
    await subject.run(_stopped())


async def _idle(subject: SandboxMetricsExports) -> bool:
    return not subject._running
