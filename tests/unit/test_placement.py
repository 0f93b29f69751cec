"""Runner choice for new sandboxes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tidepool_contracts.models import RunnerInfo, SandboxSpec
from tidepool_scheduler.placement import choose_runner

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = SandboxSpec(sandbox_id="s", organization_id="o", image="i", cpu=1, memory_gib=1)


def runner(runner_id: str, **changes: object) -> RunnerInfo:
    values: dict[str, object] = {
        "runner_id": runner_id,
        "url": f"http://{runner_id}",
        "cpu_total": 4,
        "memory_total_gib": 8,
        "heartbeat_at": NOW,
    }
    values.update(changes)
    return RunnerInfo.model_validate(values)


def test_prefers_the_emptier_runner() -> None:
    busy = runner("busy", cpu_allocated=12, memory_allocated_gib=12)
    idle = runner("idle")
    assert choose_runner([busy, idle], SPEC, NOW) == idle


def test_skips_stale_and_unschedulable_runners() -> None:
    stale = runner("stale", heartbeat_at=NOW - timedelta(minutes=5))
    cordoned = runner("cordoned", unschedulable=True)
    assert choose_runner([stale, cordoned], SPEC, NOW) is None


def test_refuses_a_runner_without_room() -> None:
    full = runner("full", cpu_allocated=16)
    assert choose_runner([full], SPEC, NOW) is None
