"""Sandbox counts per organization and state, exported as an OpenTelemetry gauge."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tidepool_contracts.models import SandboxStateEvent
from tidepool_contracts.states import SandboxState
from tidepool_telemetry.counts import SandboxCounts
from tidepool_telemetry.metrics import SANDBOX_GAUGE, build_meter_provider


def event(sandbox_id: str, organization: str, state: SandboxState) -> SandboxStateEvent:
    return SandboxStateEvent(sandbox_id=sandbox_id, organization_id=organization, state=state, source="test")


def test_gauge_reports_latest_state_per_organization() -> None:
    counts = SandboxCounts()
    reader = InMemoryMetricReader()
    provider = build_meter_provider(counts, [reader])
    counts.apply(event("a", "org-1", SandboxState.STARTED))
    counts.apply(event("b", "org-1", SandboxState.STARTED))
    counts.apply(event("c", "org-2", SandboxState.STARTED))
    counts.apply(event("b", "org-1", SandboxState.STOPPED))
    counts.apply(event("c", "org-2", SandboxState.DESTROYED))

    data = reader.get_metrics_data()
    points = {
        (dict(point.attributes)["organization.id"], dict(point.attributes)["sandbox.state"]): point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == SANDBOX_GAUGE
        for point in metric.data.data_points
    }
    assert points == {("org-1", "started"): 1, ("org-1", "stopped"): 1}
    provider.shutdown()
