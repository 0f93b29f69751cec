"""The scheduler's intent handler in FastStream's in-memory TestNatsBroker (no server), with in-memory KV."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from faststream.nats import TestNatsBroker

from tests.fakes_kv import MemoryKV
from tidepool_contracts import channels
from tidepool_contracts.models import (
    DesiredSandbox,
    IsolationKind,
    Placement,
    RunnerCapabilities,
    RunnerInfo,
    RunnerJob,
    SandboxAction,
    SandboxIntent,
    SandboxSpec,
    SandboxStateEvent,
    SnapshotTarget,
)
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import (
    Bus,
    create_broker,
    declare_publishers,
    jetstream_subscriber,
    kv_get,
    kv_put,
)
from tidepool_runtime.settings import Settings
from tidepool_scheduler import subscribers
from tidepool_scheduler.scheduler import MAX_DELIVERIES_WITHOUT_RUNNER, Scheduler


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
        controls_kv=MemoryKV(),  # type: ignore[arg-type]
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


async def test_start_of_an_archive_is_placed_anew_and_a_snapshot_leaves_the_placement() -> None:
    broker, scheduler, api, sent = await scheduler_on_test_broker()
    await kv_put(
        scheduler.runners_kv,
        "r2",
        RunnerInfo(runner_id="r2", url="http://r2", cpu_total=8, memory_total_gib=16),
    )
    # Archived on r1, which is gone since: the start must not wait for it.
    archived = Placement(
        sandbox_id="s1", runner_id="r1", last_intent_id="old", last_action=SandboxAction.ARCHIVE
    )
    await kv_put(scheduler.placements_kv, "s1", archived)
    start = intent("s1", SandboxAction.START)
    await kv_put(
        scheduler.desired_kv,
        "s1",
        DesiredSandbox(
            sandbox_id="s1",
            organization_id="o",
            desired_state=DesiredState.STARTED,
            spec=start.spec,
            intent_id=start.intent_id,
        ),
    )
    snapshot = intent("s1", SandboxAction.SNAPSHOT).model_copy(
        update={"snapshot": SnapshotTarget(snapshot_id="n", snapshot_name="n", image_ref="localhost/x:n")}
    )
    async with TestNatsBroker(broker):
        await api.publish(channels.SANDBOX_INTENTS, start, msg_id=start.intent_id, sandbox_id="s1")
        await api.publish(channels.SANDBOX_INTENTS, snapshot, msg_id=snapshot.intent_id, sandbox_id="s1")
    jobs = [item for item in sent if isinstance(item, RunnerJob)]
    assert [(job.action, job.intent_id) for job in jobs] == [
        ("start", start.intent_id),
        ("snapshot", snapshot.intent_id),
    ]
    assert jobs[1].snapshot is not None and jobs[1].snapshot.image_ref == "localhost/x:n"
    placement = await kv_get(scheduler.placements_kv, "s1", Placement)
    assert placement is not None
    # Placed on the live runner; the one-off snapshot job did not become the placement's last intent.
    assert (placement.runner_id, placement.last_intent_id) == ("r2", start.intent_id)


class Delivery:
    """The metadata `Scheduler.handle_intent` reads of a JetStream message: how often it was delivered."""

    def __init__(self, num_delivered: int) -> None:
        self.metadata = SimpleNamespace(num_delivered=num_delivered)


async def test_a_sandbox_no_runner_can_host_takes_the_no_runner_path() -> None:
    broker, scheduler, _, sent = await scheduler_on_test_broker()
    create = intent("s3", SandboxAction.CREATE)
    create = create.model_copy(update={"spec": create.spec.model_copy(update={"network_block_all": True})})
    await kv_put(
        scheduler.desired_kv,
        "s3",
        DesiredSandbox(
            sandbox_id="s3",
            organization_id="o",
            desired_state=DesiredState.STARTED,
            spec=create.spec,
            intent_id=create.intent_id,
        ),
    )
    # Plenty of room, but its backend enforces no network policy: a blocked sandbox must not land there.
    pods = RunnerCapabilities(isolation=IsolationKind.POD, network_policies=False)
    await kv_put(
        scheduler.runners_kv,
        "pod-runner",
        RunnerInfo(
            runner_id="pod-runner", url="http://p", cpu_total=64, memory_total_gib=256, capabilities=pods
        ),
    )
    async with TestNatsBroker(broker):
        # Early deliveries wait for a runner (the intent is redelivered) ...
        with pytest.raises(RuntimeError, match="no runner available yet"):
            await scheduler.handle_intent(create, Delivery(1))  # type: ignore[arg-type]
        # ... the last one fails the sandbox visibly, naming what no runner offers.
        await scheduler.handle_intent(create, Delivery(MAX_DELIVERIES_WITHOUT_RUNNER))  # type: ignore[arg-type]
    assert not [item for item in sent if isinstance(item, RunnerJob)]
    assert "s3" not in scheduler.placements_kv.entries  # type: ignore[attr-defined]
    errors = [item for item in sent if isinstance(item, SandboxStateEvent)]
    assert [(e.sandbox_id, e.state, e.error_reason) for e in errors] == [
        ("s3", SandboxState.ERROR, "no runner supports what the sandbox needs (network_policies)")
    ]

    # A runner that enforces policies (any heartbeat without capabilities does) takes it.
    await kv_put(
        scheduler.runners_kv,
        "engine-runner",
        RunnerInfo(runner_id="engine-runner", url="http://e", cpu_total=4, memory_total_gib=8),
    )
    async with TestNatsBroker(broker):
        await scheduler.handle_intent(create, Delivery(1))  # type: ignore[arg-type]
    placement = await kv_get(scheduler.placements_kv, "s3", Placement)
    assert placement is not None and placement.runner_id == "engine-runner"


async def yield_to_the_loop() -> None:
    """One turn of the event loop (other ready tasks run)."""
    turn = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(turn.set_result, None)
    await turn


async def test_a_delete_while_the_create_is_being_placed_still_reaches_the_runner() -> None:
    """A DESTROY handled while the CREATE of the same sandbox is choosing its runner must not report
    `destroyed` with no job (the CREATE's job would then make a container nobody owns): intents of one
    sandbox are handled one at a time, so the DESTROY sees the placement and sends its job after."""
    broker, scheduler, _, sent = await scheduler_on_test_broker()
    choosing, release = asyncio.Event(), asyncio.Event()

    class SlowRunners(MemoryKV):
        async def keys(self) -> list[str]:
            choosing.set()
            await release.wait()
            return await super().keys()

    scheduler.runners_kv = SlowRunners()  # type: ignore[assignment]
    info = RunnerInfo(runner_id="r1", url="http://r1", cpu_total=8, memory_total_gib=16)
    await kv_put(scheduler.runners_kv, "r1", info)
    create = intent("s1", SandboxAction.CREATE)
    desired = DesiredSandbox(
        sandbox_id="s1",
        organization_id="o",
        desired_state=DesiredState.STARTED,
        spec=create.spec,
        intent_id=create.intent_id,
    )
    await kv_put(scheduler.desired_kv, "s1", desired)
    async with TestNatsBroker(broker):
        creating = asyncio.create_task(scheduler.handle_intent(create, None))
        await choosing.wait()
        # Meanwhile the user deletes it: the API writes the desired state, then the intent.
        destroy = intent("s1", SandboxAction.DESTROY)
        deleted = desired.model_copy(
            update={"desired_state": DesiredState.DESTROYED, "intent_id": destroy.intent_id}
        )
        await kv_put(scheduler.desired_kv, "s1", deleted)
        destroying = asyncio.create_task(scheduler.handle_intent(destroy, None))
        while not (destroying.done() or scheduler._intent_locks.queued("s1")):
            await yield_to_the_loop()
        release.set()
        await asyncio.gather(creating, destroying)
    jobs = [message.action for message in sent if isinstance(message, RunnerJob)]
    assert jobs == ["create", "destroy"], sent
