"""Issue #17: two scheduler replicas. One holds the lease and alone runs the lifecycle timers (and the
reconciler); both take intents from the one durable consumer. Kill the leader with SIGKILL: the other takes
over within the lease, and no job is sent twice — neither for intents (some in flight when the leader dies)
nor for timers.

Real parts: a nats-server of this module's own, two `python -m tidepool_scheduler` processes. The test plays
the API (desired records, intents) and a runner (its capacity, its sandboxes' routes, and it takes the
jobs from the jobs stream, counting them).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.errors import TimeoutError as NatsTimeout

from tests.conftest import free_port, nats_binary, wait_for_port, watch_server
from tests.polling import wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.models import (
    DesiredSandbox,
    Placement,
    RunnerInfo,
    RunnerJob,
    SandboxAction,
    SandboxIntent,
    SandboxRoute,
    SandboxSpec,
    SchedulerLease,
)
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import Bus, connect, decode, kv_put
from tidepool_runtime.process import die_with_parent
from tidepool_scheduler.leader import KEY, LeaderLease

LEASE_SECONDS = 2.0
RUNNER = "runner-ha"
ORG = "org-ha"


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server for these schedulers alone (the lease and the intents consumer are shared state)."""
    port = free_port()
    store = tmp_path_factory.mktemp("nats-ha")
    process = subprocess.Popen(
        [nats_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    stop_watching = watch_server(process, "nats-server (scheduler HA)")
    try:
        wait_for_port(port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_watching()
        process.terminate()
        process.wait(timeout=10)


class Replica:
    def __init__(self, name: str, url: str, folder: Path) -> None:
        self.name = name
        self.log = folder / f"scheduler-{name}.log"
        env = {
            **os.environ,
            "TIDEPOOL_NATS_URL": url,
            "TIDEPOOL_DATA_DIR": str(folder),
            "TIDEPOOL_SCHEDULER_ID": name,
            "TIDEPOOL_SCHEDULER_LEASE_SECONDS": str(LEASE_SECONDS),
            "TIDEPOOL_HEALTH_PORT": "0",
            "TIDEPOOL_LOG_JSON": "true",
            "TIDEPOOL_RECONCILE_INTERVAL_SECONDS": "0.2",
            "TIDEPOOL_LIFECYCLE_TICK_SECONDS": "0.2",
            # An auto-stop interval of 1 "minute" fires after 0.05 s: at the leader's next tick.
            "TIDEPOOL_LIFECYCLE_MINUTE_SECONDS": "0.05",
            # No job is ever answered here: the reconciler must not re-send within the test.
            "TIDEPOOL_JOB_RESEND_AFTER_SECONDS": "3600",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tidepool_scheduler"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
            preexec_fn=die_with_parent,
        )

    def events(self, name: str) -> list[dict[str, object]]:
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("{")]
        return [event for event in map(json.loads, lines) if event.get("event") == name]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FakeRunner:
    """Takes every job sent to RUNNER off the jobs stream (acked) and counts them."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.jobs: list[RunnerJob] = []
        self.subscription: object = None

    async def start(self) -> None:
        assert channels.RUNNER_JOBS.stream is not None
        self.subscription = await self.bus.jetstream.pull_subscribe(
            channels.RUNNER_JOBS.address(runner_id=RUNNER), durable="ha-test-runner"
        )
        await self.heartbeat()

    async def heartbeat(self) -> None:
        info = RunnerInfo(runner_id=RUNNER, url="http://127.0.0.1:1", cpu_total=64, memory_total_gib=256)
        await kv_put(await self.bus.kv(channels.RUNNERS), RUNNER, info)

    async def stop(self) -> None:
        await self.subscription.unsubscribe()  # type: ignore[attr-defined]

    async def drain(self) -> list[RunnerJob]:
        try:
            messages = await self.subscription.fetch(50, timeout=0.5)  # type: ignore[attr-defined]
        except (NatsTimeout, TimeoutError):
            return self.jobs
        for message in messages:
            self.jobs.append(decode(RunnerJob, message.data))
            await message.ack()
        return self.jobs


def spec(sandbox_id: str) -> SandboxSpec:
    return SandboxSpec(sandbox_id=sandbox_id, organization_id=ORG, image="alpine")


async def send_intents(bus: Bus, prefix: str, count: int) -> set[str]:
    """As the API: a desired record and a create intent per sandbox; returns the intent ids."""
    desired_kv = await bus.kv(channels.DESIRED)
    ids = set()
    for index in range(count):
        sandbox_id = f"{prefix}-{index}"
        intent = SandboxIntent(
            sandbox_id=sandbox_id, organization_id=ORG, action=SandboxAction.CREATE, spec=spec(sandbox_id)
        )
        desired = DesiredSandbox(
            sandbox_id=sandbox_id,
            organization_id=ORG,
            desired_state=DesiredState.STARTED,
            spec=spec(sandbox_id),
            intent_id=intent.intent_id,
        )
        await kv_put(desired_kv, sandbox_id, desired)
        await bus.publish(channels.SANDBOX_INTENTS, intent, sandbox_id=sandbox_id)
        ids.add(intent.intent_id)
    return ids


async def idle_sandboxes(bus: Bus, prefix: str, count: int) -> set[str]:
    """Started sandboxes, idle, with a 1-"minute" auto-stop: the leader's timers stop each once."""
    desired_kv, routes_kv = await bus.kv(channels.DESIRED), await bus.kv(channels.ROUTES)
    placements_kv = await bus.kv(channels.PLACEMENTS)
    ids = set()
    for index in range(count):
        sandbox_id = f"{prefix}-{index}"
        placement = Placement(
            sandbox_id=sandbox_id,
            runner_id=RUNNER,
            last_intent_id=f"intent-{sandbox_id}",
            last_action=SandboxAction.CREATE,
        )
        await kv_put(placements_kv, sandbox_id, placement)
        route = SandboxRoute(
            sandbox_id=sandbox_id,
            organization_id=ORG,
            runner_id=RUNNER,
            runner_url="http://127.0.0.1:1",
            state=SandboxState.STARTED,
        )
        await kv_put(routes_kv, sandbox_id, route)
        desired = DesiredSandbox(
            sandbox_id=sandbox_id,
            organization_id=ORG,
            desired_state=DesiredState.STARTED,
            spec=spec(sandbox_id),
            intent_id=f"intent-{sandbox_id}",
            auto_stop_interval=1,
        )
        await kv_put(desired_kv, sandbox_id, desired)
        ids.add(sandbox_id)
    return ids


@pytest.fixture
async def bus(own_nats: str) -> AsyncIterator[Bus]:
    test_bus = await connect(own_nats, "ha-test", (channels.SANDBOX_INTENTS,))
    try:
        yield test_bus
    finally:
        await test_bus.close()


async def test_leader_killed_the_other_takes_over_and_no_job_runs_twice(
    own_nats: str, bus: Bus, tmp_path: Path
) -> None:
    lease_kv = await bus.kv(channels.SCHEDULER_LEASE)

    async def holder() -> str | None:
        try:
            entry = await lease_kv.get("leader")
        except Exception:
            return None
        return decode(SchedulerLease, entry.value).holder if entry.value else None

    runner = FakeRunner(bus)
    await runner.start()
    replicas: dict[str, Replica] = {}
    try:
        replicas["a"] = Replica("a", own_nats, tmp_path)
        await wait_until_async(lambda: _is(holder(), "a"), "replica a never took the free lease", timeout=60)
        replicas["b"] = Replica("b", own_nats, tmp_path)
        await wait_until_async(lambda: replicas["b"].events("scheduler.ready"), "b never started", timeout=60)

        # Phase 1, a leads: intents (to either replica) and timers (only a's).
        intents = await send_intents(bus, "first", 6)
        stopped_first = await idle_sandboxes(bus, "idle-first", 4)

        async def jobs_for(intent_ids: set[str], stopped: set[str]) -> bool:
            await runner.heartbeat()
            jobs = await runner.drain()
            sent = {job.intent_id for job in jobs}
            stops = {job.sandbox_id for job in jobs if job.action == SandboxAction.STOP}
            return intent_ids <= sent and stopped <= stops

        await wait_until_async(
            lambda: jobs_for(intents, stopped_first), "phase 1 jobs never all came", timeout=60
        )
        assert await holder() == "a"  # b never took the lease while a renewed it
        assert not replicas["b"].events("lifecycle.fired"), "a follower ran the lifecycle timers"

        # Phase 2: intents in flight while the leader is killed.
        intents |= await send_intents(bus, "second", 6)
        replicas["a"].process.send_signal(signal.SIGKILL)
        replicas["a"].process.wait()
        killed = time.monotonic()
        await wait_until_async(lambda: _is(holder(), "b"), "b never took over the lease", timeout=60)
        print(f"\nscheduler takeover after SIGKILL of the leader: {time.monotonic() - killed:.2f} s "
              f"(lease {LEASE_SECONDS} s)")  # fmt: skip
        stopped_second = await idle_sandboxes(bus, "idle-second", 4)
        await wait_until_async(
            lambda: jobs_for(intents, stopped_first | stopped_second),
            "phase 2 jobs never all came (intents of the dead leader are redelivered after ack_wait)",
            timeout=90,
        )
        fired = {str(event["sandbox_id"]) for event in replicas["b"].events("lifecycle.fired")}
        assert fired == stopped_second, "the new leader fired timers it should not have (or missed some)"

        # No publisher left: everything ever sent to the runner is now in `runner.jobs`.
        replicas["b"].stop()
        await runner.drain()
        creates = Counter(job.intent_id for job in runner.jobs if job.action == SandboxAction.CREATE)
        stops = Counter(job.sandbox_id for job in runner.jobs if job.action == SandboxAction.STOP)
        assert set(creates) == intents and set(creates.values()) == {1}, creates
        assert set(stops) == stopped_first | stopped_second and set(stops.values()) == {1}, stops
    finally:
        for replica in replicas.values():
            replica.stop()
        await runner.stop()


async def _is(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_lease_is_never_held_by_two_replicas(bus: Bus) -> None:
    """The lease itself, stepped by hand: a follower takes over only once the leader's own view of its
    lease has lapsed, a deposed leader learns it at its next renewal, and stepping down frees it at once."""
    kv = await bus.kv(channels.SCHEDULER_LEASE)
    with contextlib.suppress(Exception):
        await kv.purge(KEY)
    first, second = LeaderLease(kv, "one", 3.0), LeaderLease(kv, "two", 3.0)
    await first.step()
    await second.step()
    assert first.is_leader and not second.is_leader
    await first.step()  # renews: the follower's clock restarts at the new revision
    await second.step()
    assert first.is_leader and not second.is_leader

    async def second_took_over() -> bool:
        await second.step()
        assert not (first.is_leader and second.is_leader), "two leaders at once"
        return second.is_leader

    # `first` stops renewing (as if cut off): `second` takes over, never while `first` still counts itself
    # leader.
    await wait_until_async(second_took_over, "the follower never took over", timeout=30)
    assert not first.is_leader
    await first.step()  # its compare-and-set fails: it follows
    assert not first.is_leader and second.is_leader
    await second.step_down()
    await first.step()
    assert first.is_leader and not second.is_leader
    await first.step_down()
