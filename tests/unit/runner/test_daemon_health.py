"""The runner's toolbox health check against a fake daemon on a verified socket and a real nats-server: a
daemon that stops answering is restarted (SIGUSR1 through the engine) and the restart becomes an event; one
that stays silent puts the sandbox in `error` (recoverable) and back in `started` once it answers again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.unit.runner.sockets import SANDBOX_ROOT_UID, serve_as
from tidepool_contracts import channels
from tidepool_contracts.models import (
    DaemonHealthEvent,
    DaemonHealthOutcome,
    SandboxRoute,
    SandboxStateEvent,
)
from tidepool_contracts.states import SandboxState
from tidepool_contracts.subjects import event_daemon, event_sandbox
from tidepool_runner.container_config import ORGANIZATION_LABEL, SANDBOX_LABEL, container_name
from tidepool_runner.daemon_connections import DaemonConnections
from tidepool_runner.daemon_health import DaemonHealthChecker
from tidepool_runner.engine import ContainerStatus, ContainerSummary
from tidepool_runtime.broker import Bus, kv_get, kv_put
from tidepool_runtime.locks import SandboxLocks
from tidepool_runtime.settings import Settings

RUNNER_ID = "runner-health-unit"
ORGANIZATION_ID = "org-health"


@dataclass
class FakeDaemon:
    """Answers GET /version, or (wedged) never answers at all, like a daemon stuck in a regex."""

    wedged: bool = False
    requests: int = 0
    _never: asyncio.Event = field(default_factory=asyncio.Event)

    async def version(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.wedged:
            await self._never.wait()
        return web.json_response({"version": "0.1.0"})

    def release(self) -> None:
        """Let the requests still hanging finish (so the server can shut down)."""
        self._never.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/version", self.version)
        return app


@dataclass
class FakeEngine:
    """One running container; `on_signal` is what the daemon's supervisor does with the signal."""

    sandbox_id: str
    on_signal: Callable[[], None]
    running: bool = True
    signals: list[tuple[str, str]] = field(default_factory=list)
    processes: int | None = 3
    pids_limit: int = 4096

    async def list_sandboxes(self) -> list[ContainerSummary]:
        labels = {SANDBOX_LABEL: self.sandbox_id, ORGANIZATION_LABEL: ORGANIZATION_ID}
        state = "running" if self.running else "exited"
        return [ContainerSummary(container_name(self.sandbox_id), state, labels)]

    async def inspect(self, name: str) -> ContainerStatus | None:
        return ContainerStatus(
            name, running=self.running, paused=False, status="", exit_code=0, pids_limit=self.pids_limit
        )

    async def process_count(self, container_id: str) -> int | None:
        return self.processes

    async def signal(self, container_id: str, signal_name: str) -> None:
        self.signals.append((container_id, signal_name))
        self.on_signal()


@dataclass
class Harness:
    checker: DaemonHealthChecker
    daemon: FakeDaemon
    engine: FakeEngine
    bus: Bus
    sandbox_id: str
    states: asyncio.Queue[SandboxStateEvent]
    health: asyncio.Queue[DaemonHealthEvent]

    async def round(self) -> None:
        """One check round, plus the restart it may have started."""
        await self.checker.check_once()
        tracked = self.checker._tracked.get(self.sandbox_id)
        if tracked is not None and tracked.incident is not None:
            await tracked.incident

    async def route(self) -> SandboxRoute | None:
        return await kv_get(await self.bus.kv(channels.ROUTES), self.sandbox_id, SandboxRoute)


@pytest.fixture
async def harness(bus: Bus, short_tmp: Path) -> AsyncIterator[Harness]:
    sandbox_id = f"sbx-{uuid.uuid4()}"
    daemon = FakeDaemon()
    runner = web.AppRunner(daemon.app())
    await runner.setup()
    await serve_as(SANDBOX_ROOT_UID, runner, short_tmp / "sockets" / sandbox_id)
    daemons = DaemonConnections(lambda name: short_tmp / "sockets" / name)
    engine = FakeEngine(sandbox_id, on_signal=lambda: None)
    settings = Settings(
        data_dir=short_tmp,
        daemon_health_timeout_seconds=0.5,
        daemon_health_failures=2,
        daemon_restart_wait_seconds=2.0,
    )
    routes = await bus.kv(channels.ROUTES)
    await kv_put(
        routes,
        sandbox_id,
        SandboxRoute(
            sandbox_id=sandbox_id,
            organization_id=ORGANIZATION_ID,
            runner_id=RUNNER_ID,
            runner_url="http://runner.test",
            state=SandboxState.STARTED,
        ),
    )
    checker = DaemonHealthChecker(
        settings=settings,
        runner_id=RUNNER_ID,
        engine=engine,  # type: ignore[arg-type]
        daemons=daemons,
        bus=bus,
        routes=routes,
        locks=SandboxLocks(),
    )
    states: asyncio.Queue[SandboxStateEvent] = asyncio.Queue()
    health: asyncio.Queue[DaemonHealthEvent] = asyncio.Queue()

    async def on_state(msg: Any) -> None:
        await states.put(SandboxStateEvent.model_validate(orjson.loads(msg.data)))

    async def on_health(msg: Any) -> None:
        await health.put(DaemonHealthEvent.model_validate(orjson.loads(msg.data)))

    subscriptions = [
        await bus.broker.connection.subscribe(event_sandbox(sandbox_id), cb=on_state),
        await bus.broker.connection.subscribe(event_daemon(sandbox_id), cb=on_health),
    ]
    yield Harness(checker, daemon, engine, bus, sandbox_id, states, health)
    for subscription in subscriptions:
        await subscription.unsubscribe()
    await checker.close()
    await daemons.close_all()
    daemon.release()
    await runner.cleanup()


async def next_event(queue: asyncio.Queue[Any]) -> Any:
    return await asyncio.wait_for(queue.get(), timeout=10)


async def test_an_answering_daemon_is_left_alone(harness: Harness) -> None:
    for _ in range(3):
        await harness.round()
    assert harness.daemon.requests == 3
    assert harness.engine.signals == []
    assert harness.states.empty() and harness.health.empty()


async def test_a_silent_daemon_is_restarted_and_the_restart_is_an_event(harness: Harness) -> None:
    harness.daemon.wedged = True

    def supervisor_replaces_worker() -> None:
        harness.daemon.wedged = False

    harness.engine.on_signal = supervisor_replaces_worker
    await harness.round()
    assert harness.engine.signals == [], "one unanswered check is not enough"
    await harness.round()
    assert harness.engine.signals == [(container_name(harness.sandbox_id), "SIGUSR1")]
    event = await next_event(harness.health)
    assert event.outcome == DaemonHealthOutcome.RESTARTED
    assert event.organization_id == ORGANIZATION_ID
    assert "did not answer GET /version within 0.5 s in 2 checks in a row" in event.reason
    assert harness.states.empty(), "a successful restart leaves the state alone"
    assert (await harness.route()).state == SandboxState.STARTED  # type: ignore[union-attr]
    await harness.round()
    assert len(harness.engine.signals) == 1


async def test_a_daemon_starved_by_a_sandbox_at_its_process_limit_is_not_restarted(harness: Harness) -> None:
    # A fork bomb holds every pid: killing the worker would lose the deadline that ends the bomb.
    harness.daemon.wedged = True
    harness.engine.processes = harness.engine.pids_limit
    for _ in range(4):
        await harness.round()
    assert harness.engine.signals == []
    assert harness.states.empty() and harness.health.empty()
    assert (await harness.route()).state == SandboxState.STARTED  # type: ignore[union-attr]
    # The bomb has ended but the daemon still does not answer: now it is restarted.
    harness.engine.processes = 5
    for _ in range(2):
        await harness.round()
    assert harness.engine.signals == [(container_name(harness.sandbox_id), "SIGUSR1")]


async def test_a_daemon_that_stays_silent_makes_the_sandbox_error_then_recovers(harness: Harness) -> None:
    harness.daemon.wedged = True  # and the signal changes nothing: the supervisor itself is stuck
    await harness.round()
    await harness.round()
    assert len(harness.engine.signals) == 1
    failed = await next_event(harness.health)
    assert failed.outcome == DaemonHealthOutcome.RESTART_FAILED
    error = await next_event(harness.states)
    assert error.state == SandboxState.ERROR and error.recoverable is True
    assert error.error_reason is not None and "stop and start the sandbox" in error.error_reason
    assert "still did not answer 2 s after a restart" in error.error_reason
    assert (await harness.route()).state == SandboxState.ERROR  # type: ignore[union-attr]

    await harness.round()
    assert len(harness.engine.signals) == 1, "no restart loop while in error"
    harness.daemon.wedged = False
    await harness.round()
    started = await next_event(harness.states)
    assert started.state == SandboxState.STARTED and started.daemon_version == "0.1.0"
    assert (await next_event(harness.health)).outcome == DaemonHealthOutcome.RECOVERED
    assert (await harness.route()).state == SandboxState.STARTED  # type: ignore[union-attr]


@pytest.mark.parametrize("state", [SandboxState.STARTING, SandboxState.STOPPING, SandboxState.ERROR])
async def test_sandboxes_a_job_owns_are_not_checked(harness: Harness, state: SandboxState) -> None:
    routes = await harness.bus.kv(channels.ROUTES)
    route = await harness.route()
    assert route is not None
    await kv_put(routes, harness.sandbox_id, route.model_copy(update={"state": state}))
    harness.daemon.wedged = True
    for _ in range(3):
        await harness.round()
    assert harness.daemon.requests == 0 and harness.engine.signals == []


async def test_a_stopped_container_is_not_restarted(harness: Harness) -> None:
    harness.daemon.wedged = True
    await harness.round()
    harness.engine.running = False  # stopped between the checks
    await harness.round()
    assert harness.engine.signals == []
    assert harness.checker._tracked == {}


async def test_a_replaced_socket_is_a_failed_check_and_ends_in_a_recoverable_error(
    harness: Harness, short_tmp: Path
) -> None:
    """The sandbox's root swapped its socket for a link (test_isolation_sdk.py's attack): its toolbox is
    unusable, so the restart runs; the link is still there afterwards, so the sandbox is reported `error`
    (recoverable) and the events say what the check found, with the path the sandbox knows."""
    socket_dir = short_tmp / "sockets" / harness.sandbox_id
    (socket_dir / "toolbox.sock").rename(socket_dir / "real.sock")
    (socket_dir / "toolbox.sock").symlink_to(socket_dir / "real.sock")
    await harness.checker.daemons.close(harness.sandbox_id)  # no pooled connection from before the swap
    await harness.round()
    assert harness.engine.signals == [], "one failed check is not enough"
    await harness.round()
    assert harness.engine.signals == [(container_name(harness.sandbox_id), "SIGUSR1")]
    failed = await next_event(harness.health)
    assert failed.outcome == DaemonHealthOutcome.RESTART_FAILED
    # O_PATH | O_NOFOLLOW opens the link itself, which is not a socket.
    found = "the toolbox socket failed the runner's checks (/run/tidepool/toolbox.sock is not a socket)"
    assert f"{found} in 2 checks in a row" in failed.reason
    error = await next_event(harness.states)
    assert error.state == SandboxState.ERROR and error.recoverable is True
    assert error.error_reason is not None and found in error.error_reason
    assert "stop and start the sandbox" in error.error_reason
    assert str(short_tmp) not in failed.reason + error.error_reason, "no host path in the tenant's events"
    assert (await harness.route()).state == SandboxState.ERROR  # type: ignore[union-attr]
    assert harness.daemon.requests == 0, "nothing was sent through the link"

    # The sandbox's root puts its socket back: the toolbox answers again.
    (socket_dir / "toolbox.sock").unlink()
    (socket_dir / "real.sock").rename(socket_dir / "toolbox.sock")
    await harness.round()
    assert (await next_event(harness.states)).state == SandboxState.STARTED
    assert (await next_event(harness.health)).outcome == DaemonHealthOutcome.RECOVERED


async def test_no_error_is_reported_while_a_job_waits_for_the_sandbox(harness: Harness) -> None:
    """A stop asked for during a failing restart waits for the sandbox's lock; an `error` reported just
    before it runs would end the user's wait for `stopped` with a failure. The job settles the state."""
    harness.daemon.wedged = True
    jobs: list[asyncio.Task[None]] = []

    async def stop_job() -> None:
        async with harness.checker.locks.hold(harness.sandbox_id):
            pass

    harness.engine.on_signal = lambda: jobs.append(asyncio.create_task(stop_job()))
    await harness.round()
    await harness.round()
    assert len(jobs) == 1
    await jobs[0]
    assert (await next_event(harness.health)).outcome == DaemonHealthOutcome.RESTART_FAILED
    assert harness.states.empty()
    assert (await harness.route()).state == SandboxState.STARTED  # type: ignore[union-attr]
