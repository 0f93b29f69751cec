"""The runner's job handlers need nothing but a `SandboxBackend`: an in-memory backend (no engine, no disks,
no sockets) drives every job action through the real bus subscriber in FastStream's TestNatsBroker, and the
handlers report routes, sandbox events and snapshot events from what the backend answers. The heartbeat and
the adoption after a restart (inventory.py) need nothing else either."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from faststream.nats import TestNatsBroker

from tests.fakes_kv import MemoryKV
from tidepool_contracts import channels
from tidepool_contracts.models import (
    IsolationKind,
    RunnerCapabilities,
    RunnerJob,
    SandboxAction,
    SandboxMetricsSample,
    SandboxRoute,
    SandboxSpec,
    SandboxStateEvent,
    SnapshotEvent,
    SnapshotState,
    SnapshotTarget,
    utc_now,
)
from tidepool_contracts.states import SandboxState
from tidepool_runner import subscribers
from tidepool_runner.backend import (
    BackendUnavailableError,
    HostedSandbox,
    SandboxBackend,
    SandboxFailedError,
    SnapshotImage,
    ToolboxChannel,
    ToolboxUnreachableError,
)
from tidepool_runner.container_backend import ContainerEngineBackend
from tidepool_runner.daemon_connections import DaemonConnections
from tidepool_runner.disks import SandboxDisks
from tidepool_runner.inventory import Inventory
from tidepool_runner.jobs import MAX_TRANSIENT_ATTEMPTS, JobExecutor
from tidepool_runner.resource_samples import ResourceSampler
from tidepool_runtime.broker import Bus, create_broker, declare_publishers, jetstream_subscriber, kv_get
from tidepool_runtime.settings import Settings

RUNNER_ID = "runner-fake"


class NoToolbox:
    """A toolbox channel for sandboxes that are only dicts: nothing ever answers."""

    def session(self, sandbox_id: str) -> aiohttp.ClientSession:
        raise OSError(f"sandbox {sandbox_id} has no daemon")

    def port_session(self, sandbox_id: str, port: int) -> aiohttp.ClientSession:
        raise OSError(f"sandbox {sandbox_id} has no daemon")

    async def probe_version(self, sandbox_id: str) -> str | None:
        return None

    async def open_tunnel(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise ToolboxUnreachableError(f"sandbox {sandbox_id} has no daemon")

    async def close(self, sandbox_id: str) -> None:
        return None

    async def close_all(self) -> None:
        return None


@dataclass
class FakePodBackend:
    """Sandboxes as entries of a dict, as a Pod backend would keep them in a cluster: no live resize."""

    sandboxes: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    _toolbox: NoToolbox = field(default_factory=NoToolbox)

    @property
    def capabilities(self) -> RunnerCapabilities:
        return RunnerCapabilities(isolation=IsolationKind.POD, runtime_class="gvisor", live_resize=False)

    @property
    def toolbox(self) -> ToolboxChannel:
        return self._toolbox

    def _call(self, name: str, sandbox_id: str) -> None:
        self.calls.append(f"{name} {sandbox_id}")
        if name in self.fail:
            raise self.fail[name]

    async def list_sandboxes(self) -> list[HostedSandbox]:
        if "list" in self.fail:
            raise self.fail["list"]
        return [
            HostedSandbox(
                sandbox_id=sandbox_id,
                organization_id="org-1",
                state=SandboxState.STARTED if sandbox.get("running") else SandboxState.STOPPED,
                running=bool(sandbox.get("running")),
                cpu=sandbox.get("cpu", 1),
                memory_gib=1,
            )
            for sandbox_id, sandbox in self.sandboxes.items()
        ]

    async def stats(self) -> list[SandboxMetricsSample]:
        return [
            SandboxMetricsSample(
                sandbox_id=sandbox.sandbox_id,
                organization_id=sandbox.organization_id,
                runner_id=RUNNER_ID,
                sampled_at=utc_now(),
                cpu_limit=float(sandbox.cpu),
                memory_usage=1 << 20,
            )
            for sandbox in await self.list_sandboxes()
            if sandbox.running
        ]

    async def adopt(self) -> list[HostedSandbox]:
        self.calls.append("adopt")
        return await self.list_sandboxes()

    async def start(self, spec: SandboxSpec) -> str:
        self._call("start", spec.sandbox_id)
        sandbox = self.sandboxes.setdefault(spec.sandbox_id, {"image": spec.image})
        sandbox.update(running=True, cpu=spec.cpu, env=spec.env)
        return "fake-daemon-1"

    async def claim(self, spec: SandboxSpec) -> str:
        self._call("claim", spec.sandbox_id)
        if not self.sandboxes.get(spec.sandbox_id, {}).get("running"):
            return await self.start(spec)
        self.sandboxes[spec.sandbox_id]["env"] = spec.env
        return "fake-daemon-1"

    async def stop(self, spec: SandboxSpec, *, force: bool = False) -> None:
        self._call("stop --force" if force else "stop", spec.sandbox_id)
        if spec.sandbox_id not in self.sandboxes:
            raise SandboxFailedError("container missing")
        self.sandboxes[spec.sandbox_id]["running"] = False

    async def recover(self, spec: SandboxSpec) -> str:
        self._call("recover", spec.sandbox_id)
        return await self.start(spec)

    async def delete(self, sandbox_id: str) -> None:
        self._call("delete", sandbox_id)
        self.sandboxes.pop(sandbox_id, None)

    async def resize(self, spec: SandboxSpec) -> bool:
        self._call("resize", spec.sandbox_id)
        if self.sandboxes.get(spec.sandbox_id, {}).get("running"):
            raise SandboxFailedError("this backend cannot resize a running sandbox")
        return False

    async def update_network(self, spec: SandboxSpec) -> None:
        self._call("network", spec.sandbox_id)
        if spec.sandbox_id in self.sandboxes:
            self.sandboxes[spec.sandbox_id]["allow"] = list(spec.network_allow_list)

    async def archive(self, spec: SandboxSpec, archive_id: str) -> str:
        self._call("archive", spec.sandbox_id)
        self.sandboxes.pop(spec.sandbox_id, None)
        return f"registry.test/archive/{spec.sandbox_id}:{archive_id}"

    async def snapshot(self, spec: SandboxSpec, image_ref: str) -> SnapshotImage:
        self._call("snapshot", spec.sandbox_id)
        if spec.sandbox_id not in self.sandboxes:
            raise SandboxFailedError("the sandbox has no pod")
        return SnapshotImage(reference=f"registry.test/{image_ref}", size_bytes=4096)

    async def close(self) -> None:
        return None


class FirstDelivery:
    """TestNatsBroker hands the handler a plain NATS message, without JetStream's metadata: this one reads
    as a JetStream message's first delivery (what `JobExecutor.handle` looks at) and acks nothing."""

    @dataclass(frozen=True)
    class Metadata:
        num_delivered: int = 1

    def __init__(self, msg: Any) -> None:
        self.raw = msg
        self.metadata = FirstDelivery.Metadata()

    async def in_progress(self) -> None:
        return None


class OnTestBrokerExecutor(JobExecutor):
    async def handle(self, job: RunnerJob, msg: Any) -> None:
        assert msg is not None
        await super().handle(job, FirstDelivery(msg))  # type: ignore[arg-type]


def make_job(action: SandboxAction, sandbox_id: str = "sb-1", **changes: Any) -> RunnerJob:
    spec = SandboxSpec(sandbox_id=sandbox_id, organization_id="org-1", image="img:1", **changes)
    return RunnerJob(intent_id=f"intent-{action}", sandbox_id=sandbox_id, action=action, spec=spec)


@dataclass
class Wired:
    backend: FakePodBackend
    executor: JobExecutor
    routes: MemoryKV
    broker: Any
    scheduler: Bus
    events: list[Any]


def wired(tmp_path: Path) -> Wired:
    """A runner's job path as main.py wires it, with the fake backend in place of the container engine."""
    broker = create_broker("nats://unused:4222", "test")
    bus = Bus(broker)
    bus.add_publishers(subscribers.publishers(broker))
    backend = FakePodBackend()
    routes = MemoryKV()
    executor = OnTestBrokerExecutor(
        settings=Settings(data_dir=tmp_path, runner_public_url="http://runner.test:3003"),
        runner_id=RUNNER_ID,
        bus=bus,
        routes=routes,  # type: ignore[arg-type]
        backend=backend,
    )
    subscribers.register_jobs(broker, RUNNER_ID, executor, 4)
    events: list[Any] = []

    @jetstream_subscriber(broker, channels.SANDBOX_EVENTS, durable="probe-events")
    async def on_event(event: SandboxStateEvent) -> None:
        events.append(event)

    @jetstream_subscriber(broker, channels.SNAPSHOT_EVENTS, durable="probe-snapshots")
    async def on_snapshot(event: SnapshotEvent) -> None:
        events.append(event)

    scheduler = Bus(broker, declare_publishers(broker, channels.RUNNER_JOBS, service="scheduler"))
    return Wired(backend, executor, routes, broker, scheduler, events)


def test_the_fake_and_the_container_engine_backend_both_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(FakePodBackend(), SandboxBackend)
    container = ContainerEngineBackend(
        settings=Settings(data_dir=tmp_path),
        runner_id=RUNNER_ID,
        engine=object(),  # type: ignore[arg-type]  # never called here
        daemons=DaemonConnections(lambda sandbox_id: tmp_path / sandbox_id),
        disks=SandboxDisks(tmp_path / "disks"),
    )
    assert isinstance(container, SandboxBackend)
    assert isinstance(container.toolbox, ToolboxChannel)
    # Today's backend advertises exactly what a heartbeat without capabilities reads as.
    assert container.capabilities == RunnerCapabilities()


async def test_every_job_action_runs_through_the_backend_alone(tmp_path: Path) -> None:
    w = wired(tmp_path)
    snapshot_target = SnapshotTarget(snapshot_id="snap-1", snapshot_name="mine", image_ref="localhost/mine:1")
    jobs = [
        make_job(SandboxAction.CREATE),
        make_job(SandboxAction.NETWORK, network_allow_list=["10.1.0.0/16"]),
        make_job(SandboxAction.SNAPSHOT).model_copy(update={"snapshot": snapshot_target}),
        make_job(SandboxAction.CLAIM, env={"TENANT": "yes"}, claimed=True),
        make_job(SandboxAction.RECOVER),
        make_job(SandboxAction.STOP).model_copy(update={"force": True}),
        # Stopped: the backend changes nothing, so the handler starts it with the new size.
        make_job(SandboxAction.RESIZE, cpu=2),
        make_job(SandboxAction.STOP),
        make_job(SandboxAction.ARCHIVE),
    ]
    async with TestNatsBroker(w.broker):
        for job in jobs:
            await w.scheduler.publish(channels.RUNNER_JOBS, job, runner_id=RUNNER_ID)
        archived = await kv_get(w.routes, "sb-1", SandboxRoute)  # type: ignore[arg-type]
        await w.scheduler.publish(channels.RUNNER_JOBS, make_job(SandboxAction.DESTROY), runner_id=RUNNER_ID)

    assert w.backend.calls == [
        "start sb-1",
        "network sb-1",
        "snapshot sb-1",
        "claim sb-1",
        "recover sb-1",
        "start sb-1",
        "stop --force sb-1",
        "resize sb-1",
        "start sb-1",
        "stop sb-1",
        "archive sb-1",
        "delete sb-1",
    ]
    sandbox_states = [(e.state, e.daemon_version) for e in w.events if isinstance(e, SandboxStateEvent)]
    assert sandbox_states == [
        (SandboxState.STARTED, "fake-daemon-1"),  # create
        (SandboxState.STARTED, "fake-daemon-1"),  # claim
        (SandboxState.STARTED, "fake-daemon-1"),  # recover
        (SandboxState.STOPPED, None),
        (SandboxState.STARTED, "fake-daemon-1"),  # resize of a stopped sandbox
        (SandboxState.STOPPED, None),
        (SandboxState.ARCHIVED, None),
        (SandboxState.DESTROYED, None),
    ]
    assert all(e.runner_id == RUNNER_ID for e in w.events if isinstance(e, SandboxStateEvent))
    archive_event = next(e for e in w.events if isinstance(e, SandboxStateEvent) and e.state == "archived")
    assert archive_event.image == f"registry.test/archive/sb-1:{jobs[-1].intent_id}"
    assert archived is not None and (archived.state, archived.runner_url) == (
        SandboxState.ARCHIVED,
        "http://runner.test:3003",
    )
    # The destroy removed the runner's own route.
    assert "sb-1" not in w.routes.entries
    snapshots = [e for e in w.events if isinstance(e, SnapshotEvent)]
    assert [(s.state, s.registry_ref, s.size_bytes) for s in snapshots] == [
        (SnapshotState.ACTIVE, "registry.test/localhost/mine:1", 4096)
    ]


async def test_backend_failures_follow_the_error_policy(tmp_path: Path) -> None:
    w = wired(tmp_path)
    async with TestNatsBroker(w.broker):
        # Resizing a running sandbox on a backend that cannot: the sandbox's error, with the backend's reason.
        await w.scheduler.publish(channels.RUNNER_JOBS, make_job(SandboxAction.CREATE), runner_id=RUNNER_ID)
        await w.scheduler.publish(channels.RUNNER_JOBS, make_job(SandboxAction.RESIZE), runner_id=RUNNER_ID)
        # A snapshot of a sandbox the backend does not have: the snapshot's error, not the sandbox's.
        missing = make_job(SandboxAction.SNAPSHOT, "sb-gone").model_copy(
            update={"snapshot": SnapshotTarget(snapshot_id="s", snapshot_name="s", image_ref="localhost/s:1")}
        )
        await w.scheduler.publish(channels.RUNNER_JOBS, missing, runner_id=RUNNER_ID)
    sandbox_events = [e for e in w.events if isinstance(e, SandboxStateEvent)]
    assert [(e.state, e.error_reason) for e in sandbox_events] == [
        (SandboxState.STARTED, None),
        (SandboxState.ERROR, "this backend cannot resize a running sandbox"),
    ]
    route = await kv_get(w.routes, "sb-1", SandboxRoute)  # type: ignore[arg-type]
    assert route is not None and route.state is SandboxState.ERROR
    snapshot = next(e for e in w.events if isinstance(e, SnapshotEvent))
    assert (snapshot.state, snapshot.error_reason) == (
        SnapshotState.ERROR,
        "cannot snapshot sandbox sb-gone: the sandbox has no pod",
    )

    # Unavailable: redelivered (raised to the bus) until the last attempt, then the sandbox's error.
    w.backend.fail["start"] = BackendUnavailableError("cluster API unreachable")
    flaky = make_job(SandboxAction.START, "sb-2")
    with pytest.raises(BackendUnavailableError):
        await w.executor.execute(flaky, attempt=1)
    async with TestNatsBroker(w.broker):
        await w.executor.execute(flaky, attempt=MAX_TRANSIENT_ATTEMPTS)
    last = [e for e in w.events if isinstance(e, SandboxStateEvent)][-1]
    assert (last.sandbox_id, last.state) == ("sb-2", SandboxState.ERROR)
    assert "cluster API unreachable" in (last.error_reason or "")


async def test_heartbeat_and_adoption_come_from_the_backend(tmp_path: Path) -> None:
    backend = FakePodBackend()
    await backend.start(SandboxSpec(sandbox_id="up", organization_id="org-1", image="i", cpu=3))
    backend.sandboxes["down"] = {"running": False, "cpu": 2}
    runners, routes = MemoryKV(), MemoryKV()
    inventory = Inventory(
        settings=Settings(data_dir=tmp_path, runner_public_url="http://runner.test:3003"),
        runner_id=RUNNER_ID,
        backend=backend,
        runners=runners,  # type: ignore[arg-type]
        routes=routes,  # type: ignore[arg-type]
    )
    info = await inventory.current_info()
    assert info.capabilities == backend.capabilities and info.capabilities.isolation is IsolationKind.POD
    assert (info.cpu_allocated, info.sandboxes_running, info.sandboxes_total, info.unschedulable) == (
        3,
        1,
        2,
        False,
    )

    assert await inventory.adopt_containers() == 2
    adopted = {key: await kv_get(routes, key, SandboxRoute) for key in ("up", "down")}  # type: ignore[arg-type]
    assert {key: (route.state, route.runner_id) for key, route in adopted.items() if route} == {
        "up": (SandboxState.STARTED, RUNNER_ID),
        "down": (SandboxState.STOPPED, RUNNER_ID),
    }

    backend.fail["list"] = BackendUnavailableError("cluster API unreachable")
    assert (await inventory.current_info()).unschedulable


async def test_resource_samples_come_from_the_backend() -> None:
    backend = FakePodBackend()
    await backend.start(SandboxSpec(sandbox_id="up", organization_id="org-1", image="i", cpu=2))
    backend.sandboxes["down"] = {"running": False}
    broker = create_broker("nats://unused:4222", "test")
    bus = Bus(broker)
    bus.add_publishers(subscribers.publishers(broker))
    received: list[SandboxMetricsSample] = []

    @jetstream_subscriber(broker, channels.SANDBOX_METRICS, durable="probe-metrics")
    async def on_sample(sample: SandboxMetricsSample) -> None:
        received.append(sample)

    sampler = ResourceSampler(backend=backend, bus=bus, interval=60)
    async with TestNatsBroker(broker):
        assert await sampler.sample_once() == 1
    assert [(sample.sandbox_id, sample.cpu_limit) for sample in received] == [("up", 2.0)]
