"""The scheduler's intent handler in FastStream's in-memory TestNatsBroker (no server), with in-memory KV."""

from __future__ import annotations

from typing import Any

from faststream.nats import TestNatsBroker

from tests.fakes_kv import MemoryKV
from tidepool_contracts import channels
from tidepool_contracts.models import (
    DesiredSandbox,
    RunnerInfo,
    RunnerJob,
    SandboxAction,
    SandboxIntent,
    SandboxSpec,
    SandboxStateEvent,
)
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import Bus, create_broker, declare_publishers, jetstream_subscriber, kv_put
from tidepool_runtime.settings import Settings
from tidepool_scheduler import subscribers
from tidepool_scheduler.scheduler import Scheduler


def intent(sandbox_id: str, action: SandboxAction) -> SandboxIntent:
    spec = SandboxSpec(sandbox_id=sandbox_id, organization_id="o", image="img:1")
    return SandboxIntent(sandbox_id=sandbox_id, organization_id="o", action=action, spec=spec)


async def scheduler_on_test_broker() -> tuple[Any, Scheduler, Bus, list[Any]]:
    """A scheduler wired as in main.py, plus a probe that records every job and sandbox event it sends."""
    broker = create_broker("nats://unused:4222", "test")
    bus = Bus(broker)
    scheduler = Scheduler(
        settings=Settings(),
        bus=bus,
        runners_kv=MemoryKV(),  # type: ignore[arg-type]
        placements_kv=MemoryKV(),  # type: ignore[arg-type]
        desired_kv=MemoryKV(),  # type: ignore[arg-type]
        routes_kv=MemoryKV(),  # type: ignore[arg-type]
    )
    bus.add_publishers(subscribers.register(broker, scheduler))
    sent: list[Any] = []

    @jetstream_subscriber(broker, channels.RUNNER_JOBS, durable="probe-jobs")
    async def jobs(job: RunnerJob) -> None:
        sent.append(job)

    @jetstream_subscriber(broker, channels.SANDBOX_EVENTS, durable="probe-events")
    async def events(event: SandboxStateEvent) -> None:
        sent.append(event)

    api = Bus(broker, declare_publishers(broker, channels.SANDBOX_INTENTS, service="api"))
    return broker, scheduler, api, sent


async def test_create_intent_places_the_sandbox_and_sends_the_job_to_that_runner() -> None:
    broker, scheduler, api, sent = await scheduler_on_test_broker()
    create = intent("s1", SandboxAction.CREATE)
    desired = DesiredSandbox(
        sandbox_id="s1",
        organization_id="o",
        desired_state=DesiredState.STARTED,
        spec=create.spec,
        intent_id=create.intent_id,
    )
    await kv_put(scheduler.desired_kv, "s1", desired)
    await kv_put(
        scheduler.runners_kv,
        "r1",
        RunnerInfo(runner_id="r1", url="http://r1", cpu_total=8, memory_total_gib=16),
    )
    async with TestNatsBroker(broker):
        await api.publish(channels.SANDBOX_INTENTS, create, msg_id=create.intent_id, sandbox_id="s1")
    assert len(sent) == 1 and isinstance(sent[0], RunnerJob)
    assert (sent[0].sandbox_id, sent[0].intent_id, sent[0].action) == ("s1", create.intent_id, "create")
    assert "s1" in scheduler.placements_kv.entries  # type: ignore[attr-defined]


async def test_destroy_of_a_never_placed_sandbox_reports_destroyed_without_a_job() -> None:
    broker, _, api, sent = await scheduler_on_test_broker()
    destroy = intent("s2", SandboxAction.DESTROY)
    async with TestNatsBroker(broker):
        await api.publish(channels.SANDBOX_INTENTS, destroy, sandbox_id="s2")
    assert len(sent) == 1 and isinstance(sent[0], SandboxStateEvent)
    assert (sent[0].sandbox_id, sent[0].state) == ("s2", SandboxState.DESTROYED)
