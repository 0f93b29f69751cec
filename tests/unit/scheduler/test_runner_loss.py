"""Runner loss and cordons in the scheduler (in-memory broker and KV): a silent runner's sandboxes get a
recoverable `error` naming it, its return re-sends their desired jobs, and cordoned runners get nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from faststream.nats import TestNatsBroker

from tests.unit.scheduler.test_scheduler_handlers import intent, scheduler_on_test_broker
from tidepool_contracts.models import (
    DesiredSandbox,
    Placement,
    RunnerControl,
    RunnerInfo,
    RunnerJob,
    SandboxAction,
    SandboxRoute,
    SandboxSpec,
    SandboxStateEvent,
)
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import kv_get, kv_put
from tidepool_scheduler.runner_loss import RUNNER_LOST, RunnerWatch
from tidepool_scheduler.scheduler import Scheduler

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def place(
    scheduler: Scheduler, sandbox_id: str, desired_state: DesiredState, route_state: SandboxState
) -> None:
    spec = SandboxSpec(sandbox_id=sandbox_id, organization_id="o", image="img:1")
    desired = DesiredSandbox(
        sandbox_id=sandbox_id, organization_id="o", desired_state=desired_state, spec=spec, intent_id="i0"
    )
    await kv_put(scheduler.desired_kv, sandbox_id, desired)
    placement = Placement(
        sandbox_id=sandbox_id, runner_id="r1", last_intent_id="i0", last_action=SandboxAction.CREATE
    )
    await kv_put(scheduler.placements_kv, sandbox_id, placement)
    route = SandboxRoute(
        sandbox_id=sandbox_id, organization_id="o", runner_id="r1", runner_url="http://r1", state=route_state
    )
    await kv_put(scheduler.routes_kv, sandbox_id, route)


async def heartbeat(scheduler: Scheduler, at: datetime) -> None:
    info = RunnerInfo(runner_id="r1", url="http://r1", cpu_total=8, memory_total_gib=16, heartbeat_at=at)
    await kv_put(scheduler.runners_kv, "r1", info)


async def test_a_silent_runner_is_lost_then_back() -> None:
    broker, scheduler, _api, sent = await scheduler_on_test_broker()
    lost_after = scheduler.settings.runner_lost_after_seconds
    await place(scheduler, "running", DesiredState.STARTED, SandboxState.STARTED)
    await place(scheduler, "stopped", DesiredState.STOPPED, SandboxState.STOPPED)
    await place(scheduler, "deleting", DesiredState.DESTROYED, SandboxState.STARTED)
    await place(scheduler, "failed", DesiredState.STARTED, SandboxState.ERROR)
    await heartbeat(scheduler, T0)
    watch = RunnerWatch(scheduler)
    silent = T0 + timedelta(seconds=lost_after + 1)
    async with TestNatsBroker(broker):
        await watch.check_once(T0)  # starts the grace period
        await watch.check_once(T0 + timedelta(seconds=lost_after / 2))  # fresh: nothing to do
        assert sent == []
        await watch.check_once(silent)  # the grace period is over and the heartbeat is old: lost
        await watch.check_once(silent + timedelta(seconds=1))  # still lost: reported once
        events = [message for message in sent if isinstance(message, SandboxStateEvent)]
        assert sorted(event.sandbox_id for event in events) == ["running", "stopped"]
        for event in events:
            assert event.state is SandboxState.ERROR
            assert event.recoverable
            assert event.cause == RUNNER_LOST
            assert event.error_reason == f"runner r1 was lost: no heartbeat for more than {lost_after:g} s"
        assert not [message for message in sent if isinstance(message, RunnerJob)]

        await heartbeat(scheduler, silent + timedelta(seconds=2))
        sent.clear()
        await watch.check_once(silent + timedelta(seconds=3))
    jobs = sorted((job.sandbox_id, job.action) for job in sent if isinstance(job, RunnerJob))
    assert jobs == [("running", SandboxAction.START), ("stopped", SandboxAction.STOP)]
    desired = await kv_get(scheduler.desired_kv, "running", DesiredSandbox)
    placement = await kv_get(scheduler.placements_kv, "running", Placement)
    assert desired is not None and placement is not None
    assert desired.intent_id != "i0" and placement.last_intent_id == desired.intent_id
    assert watch.lost == {}


async def test_an_expired_heartbeat_entry_is_a_lost_runner() -> None:
    broker, scheduler, _api, sent = await scheduler_on_test_broker()
    await place(scheduler, "running", DesiredState.STARTED, SandboxState.STARTED)
    watch = RunnerWatch(scheduler)
    async with TestNatsBroker(broker):
        await watch.check_once(T0)
        await watch.check_once(T0 + timedelta(seconds=scheduler.settings.runner_lost_after_seconds))
    assert [(event.sandbox_id, event.state) for event in sent] == [("running", SandboxState.ERROR)]


async def test_a_short_listing_of_heartbeats_does_not_lose_a_live_runner() -> None:
    """nats-py's keys() can come back empty on a loaded server: the runner's own entry decides."""
    broker, scheduler, _api, sent = await scheduler_on_test_broker()
    await place(scheduler, "running", DesiredState.STARTED, SandboxState.STARTED)
    later = T0 + timedelta(seconds=scheduler.settings.runner_lost_after_seconds)
    await heartbeat(scheduler, later)

    async def no_keys() -> list[str]:
        return []

    scheduler.runners_kv.keys = no_keys  # type: ignore[method-assign]
    watch = RunnerWatch(scheduler)
    async with TestNatsBroker(broker):
        await watch.check_once(T0)
        await watch.check_once(later)
    assert sent == [] and watch.lost == {}


async def test_a_cordoned_or_draining_runner_gets_no_new_sandbox() -> None:
    broker, scheduler, _api, _sent = await scheduler_on_test_broker()
    await heartbeat(scheduler, datetime.now(UTC))
    create = intent("new", SandboxAction.CREATE)
    desired = DesiredSandbox(
        sandbox_id="new",
        organization_id="o",
        desired_state=DesiredState.STARTED,
        spec=create.spec,
        intent_id=create.intent_id,
    )
    await kv_put(scheduler.desired_kv, "new", desired)
    async with TestNatsBroker(broker):
        for control in (
            RunnerControl(runner_id="r1", cordoned=True),
            RunnerControl(runner_id="r1", draining=True),
        ):
            await kv_put(scheduler.controls_kv, "r1", control)
            with pytest.raises(RuntimeError, match="no runner available yet"):
                await scheduler.handle_intent(create, None)
            assert await kv_get(scheduler.placements_kv, "new", Placement) is None
        await kv_put(scheduler.controls_kv, "r1", RunnerControl(runner_id="r1"))
        await scheduler.handle_intent(create, None)
    placement = await kv_get(scheduler.placements_kv, "new", Placement)
    assert placement is not None and placement.runner_id == "r1"
