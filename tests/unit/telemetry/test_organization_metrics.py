"""The organization metrics (feature inventory §10 B) from sandbox events and sizes, read in memory."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.integration.otlp_receiver import MetricsReceiver
from tidepool_contracts.models import (
    DesiredSandbox,
    OrganizationTelemetry,
    SandboxSpec,
    SandboxStateEvent,
)
from tidepool_contracts.states import COMPUTE_STATES, DISK_STATES, DesiredState, SandboxState
from tidepool_runtime.sealing import OTEL_HEADERS, Sealer
from tidepool_telemetry.organization_metrics import OrganizationExports, build_organization_provider
from tidepool_telemetry.usage import OrganizationUsage, Usage


def sandbox(
    usage: OrganizationUsage, sandbox_id: str, organization: str, state: SandboxState, size: tuple
) -> None:
    cpu, memory, disk = size
    spec = SandboxSpec(
        sandbox_id=sandbox_id,
        organization_id=organization,
        image="i",
        cpu=cpu,
        memory_gib=memory,
        disk_gib=disk,
    )
    usage.apply_desired(
        DesiredSandbox(
            sandbox_id=sandbox_id,
            organization_id=organization,
            desired_state=DesiredState.STARTED,
            spec=spec,
            intent_id="x",
        )
    )
    usage.apply_state(
        SandboxStateEvent(sandbox_id=sandbox_id, organization_id=organization, state=state, source="test")
    )


def test_used_counts_compute_of_running_sandboxes_and_disk_of_stopped_ones_too() -> None:
    usage = OrganizationUsage()
    sandbox(usage, "a", "org-1", SandboxState.STARTED, (2, 4, 5))
    sandbox(usage, "b", "org-1", SandboxState.STARTED, (1, 2, 3))
    sandbox(usage, "c", "org-1", SandboxState.STOPPED, (4, 8, 10))
    sandbox(usage, "d", "org-1", SandboxState.ARCHIVED, (4, 8, 10))
    sandbox(usage, "e", "org-2", SandboxState.STARTED, (4, 8, 10))
    assert usage.used("org-1") == Usage(3, 6, 18)
    usage.apply_state(
        SandboxStateEvent(sandbox_id="c", organization_id="org-1", state="destroyed", source="t")
    )
    usage.apply_state(SandboxStateEvent(sandbox_id="a", organization_id="org-1", state="stopped", source="t"))
    assert usage.used("org-1") == Usage(1, 2, 8)
    assert usage.used("org-3") == Usage()


def test_a_resizing_sandbox_holds_its_compute_as_the_quotas_count_it() -> None:
    """The metrics and the quotas (services/api quotas.usage) share one accounting: a started sandbox
    being resized keeps its cpu and memory (it used to count as disk only here)."""
    usage = OrganizationUsage()
    sandbox(usage, "a", "org-1", SandboxState.RESIZING, (2, 4, 5))
    assert usage.used("org-1") == Usage(2, 4, 5)
    for state in SandboxState:
        usage.apply_state(SandboxStateEvent(sandbox_id="a", organization_id="org-1", state=state, source="t"))
        if state == SandboxState.DESTROYED:
            continue  # forgets the sandbox
        expected = Usage(
            2 if state in COMPUTE_STATES else 0,
            4 if state in COMPUTE_STATES else 0,
            5 if state in DISK_STATES else 0,
        )
        assert usage.used("org-1") == expected, state


def test_six_gauges_with_the_organization_on_the_resource_and_the_region_on_each_point() -> None:
    usage = OrganizationUsage()
    sandbox(usage, "a", "org-1", SandboxState.STARTED, (2, 4, 5))
    sandbox(usage, "b", "org-1", SandboxState.STOPPED, (1, 2, 3))
    sandbox(usage, "c", "org-2", SandboxState.STARTED, (4, 8, 10))
    record = OrganizationTelemetry(
        organization_id="org-1", total_cpu=10, total_memory_gib=12, total_disk_gib=30
    )
    reader = InMemoryMetricReader()
    provider = build_organization_provider("org-1", "eu", usage, lambda: record, reader)
    points: dict[str, Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        assert resource.resource.attributes["organization.id"] == "org-1"
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    assert dict(point.attributes) == {"region.id": "eu"}
                    points[metric.name] = point.value
    assert points == {
        "daytona.sandbox.used_cpu": 2,
        "daytona.sandbox.used_ram": 4,
        "daytona.sandbox.used_storage": 8,
        "daytona.sandbox.total_cpu": 10,
        "daytona.sandbox.total_ram": 12,
        "daytona.sandbox.total_storage": 30,
    }
    provider.shutdown()


async def test_exports_follow_the_records_and_a_bad_endpoint_spoils_no_other() -> None:
    receiver = MetricsReceiver()  # reachable endpoints: a provider's shutdown exports once more
    receiver.start()
    operator, grpc_url = receiver.http_url, receiver.grpc_url
    sealer = Sealer("k", OTEL_HEADERS)
    exports = OrganizationExports(
        OrganizationUsage(), "us", interval_seconds=3600, operator_endpoint=operator, opener=sealer
    )

    def record(organization: str, endpoint: str, headers: str = "") -> OrganizationTelemetry:
        return OrganizationTelemetry(
            organization_id=organization,
            endpoint=endpoint,
            headers_sealed=headers,
            total_cpu=1,
            total_memory_gib=1,
            total_disk_gib=1,
        )

    try:
        await exports.apply("a", record("a", "grpc://127.0.0.1:port"))  # the exporter refuses it
        assert exports.endpoints("a") == {operator}  # the operator's still gets it
        await exports.apply("b", record("b", grpc_url, sealer.seal('{"api-key": "x"}')))
        assert exports.endpoints("b") == {operator, grpc_url}
        await exports.apply("c", record("c", f"{operator}/c", "not sealed with this key"))
        assert exports.endpoints("c") == {operator}
        await exports.apply("b", record("b", ""))
        assert exports.endpoints("b") == {operator}
        # The removed destination got the last export of its provider, with the organization's headers.
        over_grpc = [p for p in receiver.points() if p.transport == "grpc"]
        assert {(p.headers.get("api-key"), p.resource["organization.id"]) for p in over_grpc} == {("x", "b")}
        await exports.apply("b", None)
        assert exports.endpoints("b") == set()
        await exports.close()
        assert exports.endpoints("a") == set()
    finally:
        receiver.stop()
