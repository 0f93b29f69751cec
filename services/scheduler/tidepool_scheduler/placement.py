"""Choosing a runner for a new sandbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tidepool_contracts.models import RunnerInfo, SandboxAction, SandboxSpec, required_capabilities

# Default of `runner_lost_after_seconds`: a runner whose last heartbeat is older is not offered sandboxes.
HEARTBEAT_FRESHNESS = timedelta(seconds=20)


def available_capacity_score(runner: RunnerInfo, spec: SandboxSpec) -> float:
    """Fraction of the runner left after placing the sandbox; overcommit up to 4x of CPU and 2x of memory."""
    cpu_left = runner.cpu_total * 4 - runner.cpu_allocated - spec.cpu
    memory_left = runner.memory_total_gib * 2 - runner.memory_allocated_gib - spec.memory_gib
    if cpu_left < 0 or memory_left < 0:
        return -1.0
    return min(cpu_left / (runner.cpu_total * 4), memory_left / max(1, runner.memory_total_gib * 2))


def schedulable(
    runner: RunnerInfo,
    moment: datetime,
    freshness: timedelta = HEARTBEAT_FRESHNESS,
    cordoned: frozenset[str] = frozenset(),
) -> bool:
    """Whether `runner` may get new sandboxes: it reports itself schedulable, its last heartbeat is at most
    `freshness` old (else it is lost), and the admin has not cordoned or drained it (`cordoned`: ids)."""
    return (
        not runner.unschedulable
        and moment - runner.heartbeat_at <= freshness
        and runner.runner_id not in cordoned
    )


def choose_runner(
    runners: list[RunnerInfo],
    spec: SandboxSpec,
    now: datetime | None = None,
    action: SandboxAction | None = None,
    freshness: timedelta = HEARTBEAT_FRESHNESS,
    cordoned: frozenset[str] = frozenset(),
) -> RunnerInfo | None:
    """The schedulable runner (`schedulable`) with the most room left whose backend can do what the
    sandbox (and the job `action`) needs (tidepool_contracts.models.required_capabilities); None if there
    is none. The choice never looks at how a backend isolates: any backend that advertises the
    capabilities will do."""
    moment = now or datetime.now(UTC)
    needs = required_capabilities(spec, action)
    candidates = [
        runner
        for runner in runners
        if schedulable(runner, moment, freshness, cordoned) and not runner.capabilities.unmet(needs)
    ]
    scored = [(available_capacity_score(runner, spec), runner) for runner in candidates]
    scored = [(score, runner) for score, runner in scored if score >= 0]
    if not scored:
        return None
    scored.sort(key=lambda item: (-item[0], item[1].runner_id))
    return scored[0][1]


NO_CAPACITY_REASON = "no runner with enough capacity is available"
CORDONED_REASON = "no runner takes new sandboxes: every available runner is cordoned or draining"


def no_runner_reason(
    runners: list[RunnerInfo],
    spec: SandboxSpec,
    now: datetime | None = None,
    action: SandboxAction | None = None,
    freshness: timedelta = HEARTBEAT_FRESHNESS,
    cordoned: frozenset[str] = frozenset(),
) -> str:
    """Why `choose_runner` found none, as the sandbox's error reason: every reachable runner is cordoned,
    the capabilities no fresh runner offers, or (as before capabilities existed) a lack of capacity."""
    moment = now or datetime.now(UTC)
    needs = required_capabilities(spec, action)
    reachable = [runner for runner in runners if schedulable(runner, moment, freshness)]
    if reachable and all(runner.runner_id in cordoned for runner in reachable):
        return CORDONED_REASON
    fresh = [runner for runner in reachable if runner.runner_id not in cordoned]
    if fresh and all(runner.capabilities.unmet(needs) for runner in fresh):
        missing = sorted({need for runner in fresh for need in runner.capabilities.unmet(needs)})
        return f"no runner supports what the sandbox needs ({', '.join(missing)})"
    return NO_CAPACITY_REASON
