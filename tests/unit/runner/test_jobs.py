"""Job handling through the container-engine backend with a scripted engine and a real nats-server: ordering,
reported states, error policy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.polling import wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.models import RunnerJob, SandboxAction, SandboxRoute, SandboxSpec, SandboxStateEvent
from tidepool_contracts.states import SandboxState
from tidepool_contracts.subjects import event_sandbox
from tidepool_runner.container_backend import ContainerEngineBackend
from tidepool_runner.daemon_connections import DaemonConnections
from tidepool_runner.disks import SandboxDisks
from tidepool_runner.engine import ContainerStatus, EngineUnavailableError, RootIds, SandboxFailedError
from tidepool_runner.jobs import MAX_TRANSIENT_ATTEMPTS, JobExecutor
from tidepool_runtime.broker import Bus, kv_get
from tidepool_runtime.locks import SandboxLocks
from tidepool_runtime.settings import Settings

RUNNER_ID = "runner-unit"
SANDBOX_ROOT_UID = 268_500_000


class RecordingDisks(SandboxDisks):
    """Records what the executor asks of the sandbox disks instead of mounting anything."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__(Path("/nonexistent"))
        self.calls = calls  # shared with the engine's, so their order shows

    def attach(self, sandbox_id: str, size_gib: int, upper_dir: str, work_dir: str) -> None:
        self.calls.append(f"disk.attach {sandbox_id} {size_gib} {upper_dir} {work_dir}")

    def remove(self, sandbox_id: str) -> None:
        self.calls.append(f"disk.remove {sandbox_id}")


class ScriptedEngine:
    """An in-memory engine: containers are dicts; failures are injected per operation."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.fail: dict[str, Exception] = {}
        self.calls: list[str] = []

    def _maybe_fail(self, operation: str) -> None:
        self.calls.append(operation)
        if operation in self.fail:
            raise self.fail[operation]

    async def inspect(self, name: str) -> ContainerStatus | None:
        self._maybe_fail("inspect")
        container = self.containers.get(name)
        if container is None:
            return None
        return ContainerStatus(
            container_id=name,
            running=container["running"],
            paused=False,
            status="",
            exit_code=0,
            upper_dir=f"/layers/{name}/diff",
            work_dir=f"/layers/{name}/work",
            # As an engine reports them: the creation limits (a live update is not kept).
            nano_cpus=container["config"]["HostConfig"]["NanoCpus"],
            memory_bytes=container["config"]["HostConfig"]["Memory"],
        )

    async def root_ids(self, container_id: str) -> RootIds:
        self._maybe_fail("root_ids")
        return RootIds(uid=SANDBOX_ROOT_UID, gid=SANDBOX_ROOT_UID)

    async def ensure_image(self, image_ref: str) -> None:
        self._maybe_fail("ensure_image")

    async def create(self, name: str, config: dict[str, Any]) -> str:
        self._maybe_fail("create")
        self.containers[name] = {"running": False, "config": config}
        return name

    async def initialize(self, container_id: str) -> None:
        self._maybe_fail("initialize")

    async def start(self, container_id: str) -> None:
        self._maybe_fail("start")
        self.containers[container_id]["running"] = True

    async def stop(self, container_id: str, *, timeout_seconds: int) -> None:
        self._maybe_fail("stop")
        self.containers[container_id]["running"] = False

    async def kill(self, container_id: str) -> None:
        self._maybe_fail("kill")
        self.containers[container_id]["running"] = False

    async def remove(self, name: str) -> None:
        self._maybe_fail("remove")
        self.containers.pop(name, None)

    async def log_tail(self, container_id: str, lines: int = 20) -> str:
        return ""

    async def update_resources(self, container_id: str, cpu: int, memory_bytes: int) -> None:
        self._maybe_fail(f"update {cpu} {memory_bytes}")

    async def commit(self, container_id: str, repository: str, tag: str) -> str:
        self._maybe_fail(f"commit {repository}:{tag}")
        return f"{repository}:{tag}"

    async def pause(self, container_id: str) -> None:
        self._maybe_fail("pause")

    async def unpause(self, container_id: str) -> None:
        self._maybe_fail("unpause")


class AlwaysReadyDaemons(DaemonConnections):
    async def probe_version(self, sandbox_id: str) -> str | None:
        return "daemon-test"


@pytest.fixture
async def harness(
    bus: Bus, short_tmp: Path
) -> AsyncIterator[tuple[JobExecutor, ScriptedEngine, asyncio.Queue[SandboxStateEvent]]]:
    settings = Settings(data_dir=short_tmp, runner_public_url="http://runner.test:3003")
    engine = ScriptedEngine()
    daemons = AlwaysReadyDaemons(lambda sandbox_id: short_tmp / sandbox_id)
    backend = ContainerEngineBackend(
        settings=settings,
        runner_id=RUNNER_ID,
        engine=engine,  # type: ignore[arg-type]
        daemons=daemons,
        disks=RecordingDisks(engine.calls),
    )
    executor = JobExecutor(
        settings=settings,
        runner_id=RUNNER_ID,
        bus=bus,
        routes=await bus.kv(channels.ROUTES),
        backend=backend,
    )
    events: asyncio.Queue[SandboxStateEvent] = asyncio.Queue()

    async def collect(msg: Any) -> None:
        await events.put(SandboxStateEvent.model_validate(orjson.loads(msg.data)))

    subscription = await bus.broker.connection.subscribe(event_sandbox("*"), cb=collect)
    yield executor, engine, events
    await subscription.unsubscribe()
    await daemons.close_all()


def make_job(action: SandboxAction, sandbox_id: str, *, force: bool = False) -> RunnerJob:
    spec = SandboxSpec(sandbox_id=sandbox_id, organization_id="org-1", image="img:1")
    return RunnerJob(
        intent_id=str(uuid.uuid4()), sandbox_id=sandbox_id, action=action, spec=spec, force=force
    )


async def test_lifecycle_reports_states_and_routes(
    bus: Bus, harness: tuple[JobExecutor, ScriptedEngine, asyncio.Queue[SandboxStateEvent]]
) -> None:
    executor, engine, events = harness
    sandbox_id = str(uuid.uuid4())
    routes = await bus.kv(channels.ROUTES)

    await executor.execute(make_job(SandboxAction.CREATE, sandbox_id))
    started = await asyncio.wait_for(events.get(), 5)
    assert (started.state, started.daemon_version, started.runner_id) == (
        SandboxState.STARTED,
        "daemon-test",
        RUNNER_ID,
    )
    route = await kv_get(routes, sandbox_id, SandboxRoute)
    assert route is not None
    assert (route.state, route.runner_url, route.organization_id) == (
        SandboxState.STARTED,
        "http://runner.test:3003",
        "org-1",
    )

    # The toolbox channel's folder belongs to the sandbox's own root, and no one else may enter it.
    socket_dir = executor._settings.sockets_dir / sandbox_id
    info = socket_dir.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (SANDBOX_ROOT_UID, SANDBOX_ROOT_UID, 0o700)
    # ...and is a small filesystem of its own: filling it fills nothing of another sandbox's.
    assert socket_dir.is_mount()
    with pytest.raises(OSError, match="No space left"):
        (socket_dir / "filler").write_bytes(b"\0" * (1 << 20))
    (socket_dir / "filler").unlink()
    layer = f"/layers/tidepool-{sandbox_id}"
    attach = f"disk.attach {sandbox_id} 3 {layer}/diff {layer}/work"
    # The disk goes onto the writable layer between create and the first start.
    assert [call for call in engine.calls if call in ("create", attach, "start")] == [
        "create",
        attach,
        "start",
    ]

    # A redelivered CREATE converges on the existing container instead of creating another.
    await executor.execute(make_job(SandboxAction.CREATE, sandbox_id))
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STARTED
    assert engine.calls.count("create") == 1
    assert engine.calls.count(attach) == 1  # a running sandbox's disk is not touched again

    await executor.execute(make_job(SandboxAction.STOP, sandbox_id))
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STOPPED
    route = await kv_get(routes, sandbox_id, SandboxRoute)
    assert route is not None and route.state is SandboxState.STOPPED

    await executor.execute(make_job(SandboxAction.DESTROY, sandbox_id))
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.DESTROYED
    assert await kv_get(routes, sandbox_id, SandboxRoute) is None
    assert not engine.containers
    # The disk holds the container's writable layer: deleted only once the container is gone.
    assert engine.calls[-2:] == ["remove", f"disk.remove {sandbox_id}"]
    assert not socket_dir.exists()


async def test_stop_of_missing_container_is_an_error(
    harness: tuple[JobExecutor, ScriptedEngine, asyncio.Queue[SandboxStateEvent]],
) -> None:
    executor, _, events = harness
    await executor.execute(make_job(SandboxAction.STOP, str(uuid.uuid4())))
    event = await asyncio.wait_for(events.get(), 5)
    assert (event.state, event.error_reason) == (SandboxState.ERROR, "container missing")


async def test_permanent_failure_reports_error_and_transient_retries_then_gives_up(
    harness: tuple[JobExecutor, ScriptedEngine, asyncio.Queue[SandboxStateEvent]],
) -> None:
    executor, engine, events = harness
    engine.fail["ensure_image"] = SandboxFailedError("image nope:1 not found")
    await executor.execute(make_job(SandboxAction.CREATE, str(uuid.uuid4())))
    event = await asyncio.wait_for(events.get(), 5)
    assert (event.state, event.error_reason) == (SandboxState.ERROR, "image nope:1 not found")

    engine.fail = {"inspect": EngineUnavailableError("engine down")}
    flaky = make_job(SandboxAction.CREATE, str(uuid.uuid4()))
    with pytest.raises(EngineUnavailableError):
        await executor.execute(flaky, attempt=1)
    await executor.execute(flaky, attempt=MAX_TRANSIENT_ATTEMPTS)
    event = await asyncio.wait_for(events.get(), 5)
    assert event.state is SandboxState.ERROR
    assert "engine down" in (event.error_reason or "")


async def test_sandbox_locks_keep_arrival_order_per_sandbox_only() -> None:
    locks = SandboxLocks()
    order: list[str] = []
    release_first = asyncio.Event()

    async def job(sandbox_id: str, name: str, wait: asyncio.Event | None = None) -> None:
        async with locks.hold(sandbox_id):
            if wait is not None:
                await wait.wait()
            order.append(name)

    tasks = [
        asyncio.create_task(job("a", "a1", release_first)),
        asyncio.create_task(job("a", "a2")),
        asyncio.create_task(job("a", "a3")),
        asyncio.create_task(job("b", "b1")),
    ]
    # Another sandbox is not held up by a's slow first job (which runs until release_first is set).
    await wait_until_async(lambda: order == ["b1"], lambda: f"b1 did not run alone first: {order}")
    release_first.set()
    await asyncio.gather(*tasks)
    assert order == ["b1", "a1", "a2", "a3"]
    assert not locks._locks  # no lock kept for idle sandboxes


async def test_resize_updates_a_running_container_and_every_later_start(
    harness: tuple[JobExecutor, ScriptedEngine, asyncio.Queue[SandboxStateEvent]],
) -> None:
    executor, engine, events = harness
    sandbox_id = str(uuid.uuid4())
    await executor.execute(make_job(SandboxAction.CREATE, sandbox_id))
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STARTED
    assert not [call for call in engine.calls if call.startswith("update")]  # created with its limits

    bigger = make_job(SandboxAction.RESIZE, sandbox_id)
    bigger = bigger.model_copy(update={"spec": bigger.spec.model_copy(update={"cpu": 2, "memory_gib": 4})})
    await executor.execute(bigger)
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STARTED
    assert engine.calls[-1] == f"update 2 {4 * 1024**3}"

    # The engine forgets a live update on restart: the START carrying the spec applies it again.
    await executor.execute(make_job(SandboxAction.STOP, sandbox_id))
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STOPPED
    start = bigger.model_copy(update={"action": SandboxAction.START, "job_id": str(uuid.uuid4())})
    await executor.execute(start)
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STARTED
    assert engine.calls.count(f"update 2 {4 * 1024**3}") == 2
    last_start = max(index for index, call in enumerate(engine.calls) if call == "start")
    assert f"update 2 {4 * 1024**3}" in engine.calls[last_start:]  # after the container started


async def test_archive_commits_then_frees_the_runner_and_a_redelivery_converges(
    bus: Bus, harness: tuple[JobExecutor, ScriptedEngine, asyncio.Queue[SandboxStateEvent]]
) -> None:
    executor, engine, events = harness
    sandbox_id = str(uuid.uuid4())
    await executor.execute(make_job(SandboxAction.CREATE, sandbox_id))
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STARTED
    await executor.execute(make_job(SandboxAction.STOP, sandbox_id))
    assert (await asyncio.wait_for(events.get(), 5)).state is SandboxState.STOPPED

    archive = make_job(SandboxAction.ARCHIVE, sandbox_id)
    await executor.execute(archive)
    archived = await asyncio.wait_for(events.get(), 5)
    image = f"localhost/tidepool/archive/{sandbox_id}:{archive.intent_id}"  # no registry configured here
    assert (archived.state, archived.image) == (SandboxState.ARCHIVED, image)
    # Committed from the stopped container (no pause), then container and disk gone.
    commit = f"commit {image}"
    order = [
        call for call in engine.calls if call in (commit, "pause", "remove", f"disk.remove {sandbox_id}")
    ]
    assert order == [commit, "remove", f"disk.remove {sandbox_id}"]
    assert f"tidepool-{sandbox_id}" not in engine.containers
    route = await kv_get(await bus.kv(channels.ROUTES), sandbox_id, SandboxRoute)
    assert route is not None and route.state is SandboxState.ARCHIVED

    # Redelivered after the container went: still archived, nothing is committed again.
    await executor.execute(archive)
    assert engine.calls.count(commit) == 1
    route = await kv_get(await bus.kv(channels.ROUTES), sandbox_id, SandboxRoute)
    assert route is not None and route.state is SandboxState.ARCHIVED
