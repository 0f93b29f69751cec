"""Start-up of a runner: the bus (subscribers.py), the container engine, jobs, heartbeat, toolbox server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aiodocker
import structlog
from aiohttp import web

from tidepool_contracts import channels
from tidepool_contracts.access import RUNNER
from tidepool_runner.activity import ActivityRecorder
from tidepool_runner.container_backend import ContainerEngineBackend
from tidepool_runner.container_config import SANDBOX_LABEL, runner_home, sandbox_socket_dir
from tidepool_runner.daemon_connections import DaemonConnections
from tidepool_runner.daemon_health import DaemonHealthChecker
from tidepool_runner.disks import SandboxDisks
from tidepool_runner.egress import EgressPolicies
from tidepool_runner.engine import ContainerEngine
from tidepool_runner.flowlog import FlowLogError, LoggedPacket, NflogSocket, read_forever
from tidepool_runner.inventory import Inventory
from tidepool_runner.jobs import JobExecutor
from tidepool_runner.network import prepare_sandbox_network
from tidepool_runner.owners import ClaimedOwners
from tidepool_runner.resource_samples import ResourceSampler
from tidepool_runner.staging import prepare_runtime_dir
from tidepool_runner.subscribers import publishers, register_jobs
from tidepool_runner.terminations import TerminationCollector
from tidepool_runner.toolbox_server import build_toolbox_app
from tidepool_runner.volumes import VolumeMounts
from tidepool_runtime.admission import Admission
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.health import Health, bus_check, engine_check, serve_health
from tidepool_runtime.image_refs import internal_registry_auth
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner")

DISK_POOL_CHECK_SECONDS = 0.2


class Runner:
    """Everything one runner process runs; `start()` then `stop()` (tests drive it the same way)."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self.runner_id = settings.effective_runner_id
        self.daemons = DaemonConnections(lambda sandbox_id: sandbox_socket_dir(settings, sandbox_id))
        self.disks = SandboxDisks(settings.disks_dir)
        self.volumes = VolumeMounts(settings)
        self.owners = ClaimedOwners(settings.data_dir / "claimed-owners")
        self._bus: Bus | None = None
        self._engine: ContainerEngine | None = None
        self._web: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._health: DaemonHealthChecker | None = None

    @property
    def bus(self) -> Bus | None:
        return self._bus

    @property
    def engine(self) -> ContainerEngine | None:
        return self._engine

    async def start(self) -> None:
        settings = self.settings
        # Jobs block in threads (mkfs, mount, socket-dir set-up): the default pool (cores + 4 threads) would
        # queue concurrent creates behind each other on a small machine; these threads mostly wait.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=2 * settings.runner_job_concurrency, thread_name_prefix="runner")
        )
        await asyncio.to_thread(prepare_runtime_dir, settings)
        # Ready disks a previous run left are of unknown state: start the pool afresh.
        await asyncio.to_thread(self.disks.discard_pool)
        self._bus = bus = Bus(
            create_broker(settings.nats_url, f"tidepool-runner-{self.runner_id}", **settings.nats_login),
            access=RUNNER,
            replicas=settings.nats_replicas,
            create_streams=settings.bus_create_streams,
        )
        await bus.connect()
        bus.add_publishers(publishers(bus.broker))
        routes = await bus.kv(channels.ROUTES)
        runners = await bus.kv(channels.RUNNERS)
        self._engine = engine = ContainerEngine(
            aiodocker.Docker(url=settings.effective_docker_host),
            registry_auth=lambda image: internal_registry_auth(
                image, settings.registry_url, settings.registry_username, settings.registry_password
            ),
            home=runner_home(settings),
            owners=self.owners,
            mirrors=settings.mirrors,
        )
        # Before any job can start a container: no sandbox ever runs on an unisolated network.
        await prepare_sandbox_network(engine, settings)
        # Volume mounts a previous run left for sandboxes that no longer run (or dead ones) go now.
        running = {
            summary.labels.get(SANDBOX_LABEL, "")
            for summary in await engine.list_sandboxes()
            if summary.state in ("running", "paused")
        }
        await asyncio.to_thread(self.volumes.clean_stale, running)
        # The one place that knows which backend runs the sandboxes: the handlers only see SandboxBackend.
        backend = ContainerEngineBackend(
            settings=settings,
            runner_id=self.runner_id,
            engine=engine,
            daemons=self.daemons,
            disks=self.disks,
            volumes=self.volumes,
            owners=self.owners,
        )
        executor = JobExecutor(
            settings=settings, runner_id=self.runner_id, bus=bus, routes=routes, backend=backend
        )
        inventory = Inventory(
            settings=settings, runner_id=self.runner_id, backend=backend, runners=runners, routes=routes
        )

        activity = ActivityRecorder(await bus.kv(channels.ACTIVITY), settings.activity_write_interval_seconds)
        self._web = web.AppRunner(
            build_toolbox_app(
                backend.toolbox,
                settings.runner_token,
                activity,
                Admission(
                    settings.runner_toolbox_max_in_flight,
                    queue_wait=settings.toolbox_queue_wait_seconds,
                    queue_length=settings.toolbox_queue_length,
                    hold=settings.toolbox_slot_hold_seconds,
                    retry_after_seconds=settings.toolbox_retry_after_seconds,
                    hop="runner",
                ),
            ),
            access_log=None,
        )
        await self._web.setup()
        await web.TCPSite(self._web, settings.runner_host, settings.runner_port).start()

        register_jobs(bus.broker, self.runner_id, executor, self.settings.runner_job_concurrency)

        async def adopt_then_serve_jobs() -> None:
            # Rules of sandboxes that ended while the runner was away go (their addresses are reused).
            running = [
                container.labels[SANDBOX_LABEL]
                for container in await engine.list_sandboxes()
                if container.state in ("running", "paused") and container.labels.get(SANDBOX_LABEL)
            ]
            await backend.egress.load(running)
            # Adoption first: once jobs run, a late adoption could overwrite the state a job just reported.
            await inventory.adopt_until_done()
            await bus.start()
            # The broker consumes jobs from here on; this task stays so that `wait` watches adoption too.
            await asyncio.Event().wait()

        collector = TerminationCollector(backend=backend, bus=bus)
        self._health = DaemonHealthChecker(
            settings=settings,
            runner_id=self.runner_id,
            engine=engine,
            daemons=self.daemons,
            bus=bus,
            routes=routes,
            locks=executor.locks,
        )
        flow_tasks: list[asyncio.Task[None]] = []
        if settings.sandbox_firewall:
            flow_tasks.append(await self._open_flow_log(backend.egress, bus))
        sampler = ResourceSampler(
            backend=backend, bus=bus, interval=settings.sandbox_metrics_interval_seconds
        )
        self._tasks = [
            asyncio.create_task(inventory.heartbeat_forever(), name="runner-heartbeat"),
            asyncio.create_task(collector.run_forever(), name="runner-terminations"),
            asyncio.create_task(self._health.run_forever(), name="runner-daemon-health"),
            asyncio.create_task(adopt_then_serve_jobs(), name="runner-jobs"),
            asyncio.create_task(self._keep_disk_pool_filled(), name="runner-disk-pool"),
            asyncio.create_task(backend.egress.refresh_forever(), name="runner-egress-domains"),
            asyncio.create_task(sampler.run_forever(), name="runner-resource-samples"),
            *flow_tasks,
        ]
        log.info("runner.started", runner_id=self.runner_id, url=settings.effective_runner_url)

    async def _open_flow_log(self, egress: EgressPolicies, bus: Bus) -> asyncio.Task[None]:
        """Bind this runner's NFLOG group (flowlog.py): the sandbox chains applied from now on log to it."""
        nflog = NflogSocket(self.settings.sandbox_flow_log_group)
        try:
            egress.flow_log_group = await asyncio.to_thread(nflog.open)
        except FlowLogError as error:  # observability, not enforcement: policies hold without it
            log.error("runner.flow_log_unavailable", error=str(error))
            return asyncio.create_task(asyncio.Event().wait(), name="runner-flow-log")
        log.info("runner.flow_log_opened", group=egress.flow_log_group)

        async def publish(packet: LoggedPacket) -> None:
            flow = egress.flow_of(packet, self.runner_id)
            if flow is not None:
                await bus.publish(channels.SANDBOX_FLOWS, flow, sandbox_id=flow.sandbox_id)

        return asyncio.create_task(read_forever(nflog, publish), name="runner-flow-log")

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """Its background loops (heartbeat, jobs, …): one that ends means the runner is broken."""
        return list(self._tasks)

    async def _keep_disk_pool_filled(self) -> None:
        """Keep formatted, mounted disks ready for the next creates (see disks.py), off the create path."""
        while True:
            try:
                made = await asyncio.to_thread(self.disks.refill_pool)
            except Exception as error:  # the pool is an optimisation: creates format their own disk
                log.warning("runner.disk_pool_refill_failed", error=str(error))
                made = 0
            if not made:
                await asyncio.sleep(DISK_POOL_CHECK_SECONDS)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._health is not None:
            await self._health.close()
        if self._web is not None:
            await self._web.cleanup()
        await self.daemons.close_all()
        if self._engine is not None:
            await self._engine.close()
        if self._bus is not None:
            await self._bus.close()
        log.info("runner.stopped", runner_id=self.runner_id)

    async def wait(self, stop: asyncio.Event) -> None:
        """Until `stop` is set, or until a background loop dies (then exit so the supervisor restarts us)."""
        stop_requested = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stop_requested, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
        stop_requested.cancel()
        for task in done - {stop_requested}:
            error = None if task.cancelled() else task.exception()
            log.error("runner.loop_died", loop=task.get_name(), error=repr(error))
            raise RuntimeError(f"runner loop {task.get_name()} died") from error


def runner_health(
    bus_of: Callable[[], Bus | None], engine_of: Callable[[], ContainerEngine | None]
) -> Health:
    """The runner's probes: ready while its NATS connection and its container engine's socket answer
    (`bus_of()` / `engine_of()`: None until the runner has them)."""
    return Health("runner", {"nats": bus_check(bus_of), "engine": engine_check(engine_of)})


async def main(settings: RunnerSettings, stop: asyncio.Event) -> None:
    runner = Runner(settings)
    # Its own listener: the toolbox port serves tenants' sandboxes.
    health = runner_health(lambda: runner.bus, lambda: runner.engine)
    probes = await serve_health(health, settings.health_host, settings.health_port)
    try:
        await runner.start()
        health.watch(*runner.tasks)
        await runner.wait(stop)
    finally:
        await runner.stop()
        if probes is not None:
            await probes.cleanup()
