"""Samples become Daytona's series: one per metric name asked for, sharing each sample's timestamp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tidepool_contracts.models import SandboxMetricsSample
from tidepool_telemetry.samples import downsample, series

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def sample(seconds: int, cpu: float | None) -> SandboxMetricsSample:
    return SandboxMetricsSample(
        sandbox_id="s",
        organization_id="o",
        runner_id="r",
        sampled_at=T0 + timedelta(seconds=seconds),
        cpu_utilization=cpu,
        cpu_limit=1.0,
        memory_usage=256,
        memory_limit=1024,
        filesystem_usage=10,
        filesystem_total=40,
    )


def test_series_per_name_with_derived_values_and_gaps_left_out() -> None:
    reply = series(
        [sample(0, None), sample(1, 87.5)],
        [
            "daytona.sandbox.cpu.utilization",
            "daytona.sandbox.memory.utilization",
            "daytona.sandbox.filesystem.available",
            "daytona.sandbox.memory.cache",  # never sampled: no series
            "no.such.metric",
        ],
    )
    by_name = {one.metric_name: [(p.timestamp, p.value) for p in one.points] for one in reply.series}
    assert by_name == {
        "daytona.sandbox.cpu.utilization": [(T0 + timedelta(seconds=1), 87.5)],
        "daytona.sandbox.memory.utilization": [(T0, 25.0), (T0 + timedelta(seconds=1), 25.0)],
        "daytona.sandbox.filesystem.available": [(T0, 30.0), (T0 + timedelta(seconds=1), 30.0)],
    }


def test_no_names_means_every_metric() -> None:
    names = {one.metric_name for one in series([sample(0, 5.0)], []).series}
    assert {"daytona.sandbox.cpu.utilization", "daytona.sandbox.memory.usage"} <= names


def test_long_ranges_are_averaged_down_to_a_bounded_number_of_points() -> None:
    samples = [sample(second, float(second % 2) * 100) for second in range(1000)]
    merged = downsample(samples, 100)
    assert len(merged) == 100
    # Runs of 10: CPU 0 and 100 alternate, so each run averages 50; the run's last timestamp is kept.
    assert {one.cpu_utilization for one in merged} == {50.0}
    assert merged[0].sampled_at == T0 + timedelta(seconds=9)
    assert merged[-1].sampled_at == samples[-1].sampled_at
    assert downsample(samples[:5], 100) == samples[:5]
