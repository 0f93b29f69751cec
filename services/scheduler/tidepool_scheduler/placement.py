"""Choosing a runner for a new sandbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tidepool_contracts.models import RunnerInfo, SandboxSpec

# A runner whose last heartbeat is older than this is not offered new sandboxes.
HEARTBEAT_FRESHNESS = timedelta(seconds=20)


def available_capacity_score(runner: RunnerInfo, spec: SandboxSpec) -> float:
    """Fraction of the runner left after placing the sandbox; overcommit up to 4x of CPU and 2x of memory."""
    cpu_left = runner.cpu_total * 4 - runner.cpu_allocated - spec.cpu
    memory_left = runner.memory_total_gib * 2 - runner.memory_allocated_gib - spec.memory_gib
    if cpu_left < 0 or memory_left < 0:
        return -1.0
    return min(cpu_left / (runner.cpu_total * 4), memory_left / max(1, runner.memory_total_gib * 2))


def choose_runner(
    runners: list[RunnerInfo], spec: SandboxSpec, now: datetime | None = None
) -> RunnerInfo | None:
    moment = now or datetime.now(UTC)
    candidates = [
        runner
        for runner in runners
        if not runner.unschedulable and moment - runner.heartbeat_at <= HEARTBEAT_FRESHNESS
    ]
    scored = [(available_capacity_score(runner, spec), runner) for runner in candidates]
    scored = [(score, runner) for score, runner in scored if score >= 0]
    if not scored:
        return None
    scored.sort(key=lambda item: (-item[0], item[1].runner_id))
    return scored[0][1]
