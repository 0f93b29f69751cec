"""Executes RunnerJobs against the container engine and reports the resulting state.

Every action converges: a job redelivered after a crash (or sent twice by the scheduler) finds the container
where the first attempt left it and finishes the work, so handling a job twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import (
    RunnerJob,
    SandboxAction,
    SandboxRoute,
    SandboxSpec,
    SandboxStateEvent,
    SnapshotEvent,
    SnapshotState,
)
from tidepool_contracts.states import SandboxState
from tidepool_contracts.subjects import kv_safe
from tidepool_runner.container_config import (
    GIB,
    build_container_config,
    container_name,
    sandbox_socket_dir,
    toolbox_socket_path,
)
from tidepool_runner.daemon_connections import DaemonConnections
from tidepool_runner.disks import SandboxDisks
from tidepool_runner.egress import EgressPolicies
from tidepool_runner.engine import (
    ContainerEngine,
    ContainerStatus,
    EngineUnavailableError,
    RootIds,
    SandboxFailedError,
)
from tidepool_runner.owners import ClaimedOwners
from tidepool_runner.staging import mount_socket_dir, unmount_socket_dir
from tidepool_runner.volumes import VolumeMountError, VolumeMounts
from tidepool_runtime.broker import Bus, KeyValue, Msg, keep_in_progress, kv_delete, kv_get, kv_put
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.jobs")

DAEMON_START_TIMEOUT_SECONDS = 60.0
# The socket is probed often while a daemon usually comes up (within DAEMON_FAST_PROBE_SECONDS), then less
# and less: many sandboxes starting at once would otherwise cost the runner's one core more than their
# starts do.
DAEMON_PROBE_INTERVAL_SECONDS = 0.01
DAEMON_FAST_PROBE_SECONDS = 0.4
DAEMON_PROBE_MAX_INTERVAL_SECONDS = 0.1
# Checking the container while waiting costs an engine call, so it happens less often than probing the socket.
CONTAINER_CHECK_INTERVAL_SECONDS = 0.25
STOP_TIMEOUT_SECONDS = 10
# Transient engine failures are retried via redelivery; after this many deliveries the job reports `error`.
MAX_TRANSIENT_ATTEMPTS = 5
IN_PROGRESS_INTERVAL_SECONDS = 5.0
EVENT_SOURCE = "runner"


class SandboxLocks:
    """One FIFO lock per sandbox: its jobs run strictly in arrival order; other sandboxes' run in parallel."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, sandbox_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(sandbox_id, asyncio.Lock())
        self._holders[sandbox_id] = self._holders.get(sandbox_id, 0) + 1
        try:
            # asyncio.Lock queues waiters in call order, which is the order the jobs were fetched.
            async with lock:
                yield
        finally:
            self._holders[sandbox_id] -= 1
            if self._holders[sandbox_id] == 0:
                del self._holders[sandbox_id]
                del self._locks[sandbox_id]

    def queued(self, sandbox_id: str) -> bool:
        """Whether someone waits for the sandbox's lock besides its holder (a job the holder delays)."""
        return self._holders.get(sandbox_id, 0) > 1


class JobExecutor:
    def __init__(
        self,
        *,
        settings: RunnerSettings,
        runner_id: str,
        bus: Bus,
        routes: KeyValue,
        engine: ContainerEngine,
        daemons: DaemonConnections,
        disks: SandboxDisks,
        volumes: VolumeMounts | None = None,
        egress: EgressPolicies | None = None,
        owners: ClaimedOwners | None = None,
    ) -> None:
        self._settings = settings
        self._egress = egress or EgressPolicies(settings)
        self._owners = owners
        self._volumes = volumes or VolumeMounts(settings)
        self._disks = disks
        self._runner_id = runner_id
        self._bus = bus
        self._routes = routes
        self._engine = engine
        self._daemons = daemons
        self._locks = SandboxLocks()

    @property
    def egress(self) -> EgressPolicies:
        """The sandboxes' own network policies (their rules are removed when they stop)."""
        return self._egress

    @property
    def locks(self) -> SandboxLocks:
        """The per-sandbox locks its jobs run under (the daemon health checker takes them too)."""
        return self._locks

    async def handle(self, job: RunnerJob, msg: Msg) -> None:
        """The bus handler. Must take the sandbox's lock before its first await to keep arrival order."""
        # Started first so a job queued behind a slow one of the same sandbox is not redelivered meanwhile.
        alive = asyncio.create_task(keep_in_progress(msg, IN_PROGRESS_INTERVAL_SECONDS))
        try:
            async with self._locks.hold(job.sandbox_id):
                attempt = msg.metadata.num_delivered if msg.metadata else 1
                await self.execute(job, attempt=attempt)
        finally:
            alive.cancel()

    async def execute(self, job: RunnerJob, *, attempt: int = 1) -> None:
        bound = log.bind(
            sandbox_id=job.sandbox_id, action=str(job.action), job_id=job.job_id, attempt=attempt
        )
        bound.info("job.started")
        try:
            match job.action:
                case SandboxAction.CREATE | SandboxAction.START:
                    # Same convergence either way: a START whose container vanished recreates it.
                    daemon_version = await self._ensure_running(job.spec)
                    await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)
                case SandboxAction.CLAIM:
                    daemon_version = await self._claim(job)
                    await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)
                case SandboxAction.RESIZE:
                    await self._resize(job)
                case SandboxAction.RECOVER:
                    await self._recover(job)
                case SandboxAction.STOP:
                    await self._stop(job)
                case SandboxAction.DESTROY:
                    await self._destroy(job)
                case SandboxAction.ARCHIVE:
                    await self._archive(job)
                case SandboxAction.SNAPSHOT:
                    await self._snapshot(job)
                case SandboxAction.NETWORK:
                    await self._network(job)
        except SandboxFailedError as failure:
            bound.warning("job.failed", reason=failure.reason)
            await self._report(job, SandboxState.ERROR, error_reason=failure.reason)
        except EngineUnavailableError as error:
            if attempt < MAX_TRANSIENT_ATTEMPTS:
                bound.warning("job.engine_unavailable", error=str(error))
                raise  # nak: redelivered with backoff
            await self._report(job, SandboxState.ERROR, error_reason=f"container engine unavailable: {error}")
        else:
            bound.info("job.done")

    async def _ensure_running(self, spec: SandboxSpec) -> str:
        name = container_name(spec.sandbox_id)
        status = await self._engine.inspect(name)
        if status is None:
            await self._engine.ensure_image(spec.image)
            # The binds' sources must exist when the engine creates the container.
            await asyncio.to_thread(self._volumes.prepare, spec)
            config = build_container_config(spec, self._settings, self._runner_id)
            container_id = await self._engine.create(name, config)
            status = await self._engine.inspect(container_id)
            if status is None:
                raise EngineUnavailableError("the container vanished right after it was created")
        root = await self._engine.root_ids(status.container_id)
        self._prepare_socket_dir(spec.sandbox_id, root)
        if not status.running:
            await asyncio.to_thread(
                self._disks.attach, spec.sandbox_id, spec.disk_gib, status.upper_dir, status.work_dir
            )
            # Before the start: the engine binds whatever is at the mount point when the container starts.
            try:
                await self._volumes.ensure(spec, root.uid, root.gid)
            except VolumeMountError as error:
                raise SandboxFailedError(str(error)) from None
        if status.paused:
            await self._engine.unpause(status.container_id)
        elif not status.running:
            # A stale socket from the previous run would only answer "connection refused"; start clean.
            _remove_entry(toolbox_socket_path(self._settings, spec.sandbox_id))
            await self._daemons.close(spec.sandbox_id)
            # The network (and its addresses) exists before the first process runs: its policy is in place
            # before anything in the sandbox can open a connection.
            await self._engine.initialize(status.container_id)
            initialized = await self._engine.inspect(status.container_id)
            await self._egress.converge(spec, initialized.addresses if initialized else ())
            await self._engine.start(status.container_id)
        await self._apply_resources(spec, status)
        version = await self._wait_for_daemon(spec.sandbox_id, status.container_id)
        await self._apply_claimed_env(spec)
        return version

    async def _claim(self, job: RunnerJob) -> str:
        """A warm-pool sandbox now belongs to `job.spec.organization_id`: its daemon gets the claimer's env
        (no restart); the route is rewritten by the report that follows. A container that is not running
        any more is brought up as a START would (which applies the env too)."""
        # A daemon that answers runs in a running container: no engine call on this path.
        version = await self._daemons.probe_version(job.sandbox_id)
        if version is None:
            return await self._ensure_running(job.spec)
        await self._apply_claimed_env(job.spec)
        return version

    async def _apply_claimed_env(self, spec: SandboxSpec) -> None:
        """A claimed sandbox's container was created with the pool's env: give its daemon the claimer's."""
        if not spec.claimed:
            return
        if self._owners is not None:
            await asyncio.to_thread(self._owners.record, spec.sandbox_id, spec.organization_id)
        env = {**spec.env, "DAYTONA_ORGANIZATION_ID": spec.organization_id}
        # For every later worker of the daemon (a restart by the health checker or after a crash) ...
        await asyncio.to_thread(
            _write_env_file, sandbox_socket_dir(self._settings, spec.sandbox_id) / DAEMON_ENV_FILE, env
        )
        try:
            # ... and for the one serving now.
            await self._daemons.set_env(spec.sandbox_id, env)
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise SandboxFailedError(f"cannot apply the environment to the sandbox daemon: {error}") from None

    async def _apply_resources(self, spec: SandboxSpec, status: ContainerStatus) -> None:
        """The engine keeps a container's creation limits across restarts, not a live update: after a
        resize, bring the running container to the sandbox's own cpu and memory."""
        memory_bytes = spec.memory_gib * GIB
        if status.nano_cpus != spec.cpu * 1_000_000_000 or status.memory_bytes != memory_bytes:
            await self._engine.update_resources(status.container_id, spec.cpu, memory_bytes)

    async def _recover(self, job: RunnerJob) -> None:
        """Restart the sandbox from a recoverable error (e.g. a daemon that could not be restarted): the
        container goes down (killed: it may be wedged) and comes up again, its disk and files kept."""
        status = await self._engine.inspect(container_name(job.sandbox_id))
        if status is not None and (status.running or status.paused):
            await self._engine.kill(status.container_id)
        await self._daemons.close(job.sandbox_id)
        daemon_version = await self._ensure_running(job.spec)
        await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)

    async def _network(self, job: RunnerJob) -> None:
        """A running sandbox's egress policy changed: apply it now (no restart, no state change). A stopped
        one gets it at its next start; a failure to apply is reported as the sandbox's error."""
        status = await self._engine.inspect(container_name(job.sandbox_id))
        if status is None or not (status.running or status.paused):
            return
        await self._egress.converge(job.spec, status.addresses)

    async def _resize(self, job: RunnerJob) -> None:
        """Grow a running sandbox's cpu and memory (disk only changes while stopped, at the next start)."""
        status = await self._engine.inspect(container_name(job.sandbox_id))
        if status is None or not status.running:
            # Nothing runs: the next START applies the new resources (converges like a START would).
            daemon_version = await self._ensure_running(job.spec)
            await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)
            return
        memory_bytes = job.spec.memory_gib * GIB
        await self._engine.update_resources(status.container_id, job.spec.cpu, memory_bytes)
        await self._report(job, SandboxState.STARTED)

    def _prepare_socket_dir(self, sandbox_id: str, root: RootIds) -> None:
        """The toolbox channel's folder belongs to the sandbox's root (a uid of its own user namespace),
        0700: the daemon binds its socket there before dropping to the sandbox user, who cannot enter it;
        the runner connects only to a socket served by that same uid (daemon_connections.py)."""
        socket_dir = sandbox_socket_dir(self._settings, sandbox_id)
        socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mount_socket_dir(socket_dir, root.uid, root.gid)
        os.chown(socket_dir, root.uid, root.gid, follow_symlinks=False)
        os.chmod(socket_dir, 0o700, follow_symlinks=False)

    async def _wait_for_daemon(self, sandbox_id: str, container_id: str) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DAEMON_START_TIMEOUT_SECONDS
        next_container_check = loop.time() + CONTAINER_CHECK_INTERVAL_SECONDS
        interval = DAEMON_PROBE_INTERVAL_SECONDS
        slow_after = loop.time() + DAEMON_FAST_PROBE_SECONDS
        while True:
            version = await self._daemons.probe_version(sandbox_id)
            if version is not None:
                return version
            now = loop.time()
            if now >= deadline:
                logs = await self._engine.log_tail(container_id)
                raise SandboxFailedError(
                    f"sandbox daemon did not answer within {DAEMON_START_TIMEOUT_SECONDS:.0f} s"
                    + (f"; last log lines: {logs}" if logs else "")
                )
            if now >= next_container_check:
                # An engine call each: rarer once the start is slow (the engine is busy with other starts).
                slow = now >= slow_after
                next_container_check = now + CONTAINER_CHECK_INTERVAL_SECONDS * (4 if slow else 1)
                status = await self._engine.inspect(container_id)
                if status is None or not status.running:
                    logs = await self._engine.log_tail(container_id) if status is not None else ""
                    exit_code = status.exit_code if status is not None else "unknown"
                    raise SandboxFailedError(
                        f"sandbox container exited (code {exit_code}) before its daemon was ready"
                        + (f"; last log lines: {logs}" if logs else "")
                    )
            await asyncio.sleep(interval)
            if now >= slow_after:
                interval = min(interval * 1.5, DAEMON_PROBE_MAX_INTERVAL_SECONDS)

    async def _stop(self, job: RunnerJob) -> None:
        status = await self._engine.inspect(container_name(job.sandbox_id))
        if status is None:
            raise SandboxFailedError("container missing")
        if status.running or status.paused:
            if job.force:
                await self._engine.kill(status.container_id)
            else:
                await self._engine.stop(status.container_id, timeout_seconds=STOP_TIMEOUT_SECONDS)
        await self._daemons.close(job.sandbox_id)
        await self._egress.remove(job.sandbox_id)
        await asyncio.to_thread(self._volumes.release, job.sandbox_id)
        await self._report(job, SandboxState.STOPPED)

    async def _commit(self, job: RunnerJob, status: ContainerStatus, local_ref: str) -> str:
        """Commit the sandbox's filesystem to `local_ref` and, with a platform registry, push it there and
        drop the local copy; returns the reference any runner can start it from."""
        if not status.running and not status.paused:
            # The writable layer lives on the sandbox's disk: make sure it is mounted and linked.
            await asyncio.to_thread(
                self._disks.attach, job.sandbox_id, job.spec.disk_gib, status.upper_dir, status.work_dir
            )
        repository, tag = _split_ref(local_ref)
        # The layer holds the host's ids of the sandbox's user namespace, and the engine's commit copies them
        # as they are (its own mapping is the kernel's, on mount): an image made so would show every changed
        # file as `nobody`. So the layer is shifted to the sandbox's own ids for the copy and back after it,
        # with the sandbox frozen meanwhile if it runs.
        root = await self._engine.root_ids(status.container_id)
        upper = self._disks.paths(job.sandbox_id).upper
        freeze = status.running and not status.paused
        if freeze:
            await self._engine.pause(status.container_id)
        try:
            shifted = await asyncio.to_thread(shift_down, upper, root)
            try:
                await self._engine.commit(status.container_id, repository, tag)
            finally:
                await asyncio.to_thread(shift_up, shifted, root)
        finally:
            if freeze:
                await self._engine.unpause(status.container_id)
        registry = self._settings.registry_url
        if not registry:
            return local_ref
        target_repository, target_tag = registry_reference(registry, local_ref)
        pushed = await self._engine.push(local_ref, target_repository, target_tag)
        await self._engine.remove_image(local_ref)
        await self._engine.remove_image(pushed)
        return pushed

    def _archive_ref(self, job: RunnerJob) -> tuple[str, str]:
        """The archive's local name and where it ends up (deterministic: a redelivered job finds it)."""
        local_ref = f"localhost/tidepool/archive/{job.sandbox_id}:{job.intent_id}"
        registry = self._settings.registry_url
        if not registry:
            return local_ref, local_ref
        repository, tag = registry_reference(registry, local_ref)
        return local_ref, f"{repository}:{tag}"

    async def _archive(self, job: RunnerJob) -> None:
        """Commit a stopped sandbox's filesystem (files, installed packages) to an image, push it to the
        platform registry and remove its container and disk: the runner keeps nothing of it. Its next START
        recreates the container from that image on whichever runner the scheduler picks."""
        local_ref, final_ref = self._archive_ref(job)
        status = await self._engine.inspect(container_name(job.sandbox_id))
        if status is not None:
            if status.running or status.paused:
                await self._engine.stop(status.container_id, timeout_seconds=STOP_TIMEOUT_SECONDS)
                status = await self._engine.inspect(status.container_id) or status
            await self._daemons.close(job.sandbox_id)
            final_ref = await self._commit(job, status, local_ref)
        # else: a redelivered job whose first attempt committed and removed the container already.
        await self._remove_container_and_disk(job.sandbox_id)
        await self._report(job, SandboxState.ARCHIVED, image=final_ref)

    async def _snapshot(self, job: RunnerJob) -> None:
        """Commit the sandbox's filesystem to the snapshot `job.snapshot` names and report that snapshot (not
        the sandbox) active, or failed with the reason."""
        target = job.snapshot
        if target is None:
            return
        event: SnapshotEvent
        try:
            status = await self._engine.inspect(container_name(job.sandbox_id))
            if status is None:
                raise SandboxFailedError("the sandbox has no container on its runner")
            reference = await self._commit(job, status, target.image_ref)
            event = SnapshotEvent(
                snapshot_id=target.snapshot_id,
                snapshot_name=target.snapshot_name,
                image_ref=target.image_ref,
                state=SnapshotState.ACTIVE,
                entrypoint=job.spec.entrypoint,
                size_bytes=await self._engine.image_size(reference),
                registry_ref=reference if reference != target.image_ref else None,
            )
        except SandboxFailedError as failure:
            event = SnapshotEvent(
                snapshot_id=target.snapshot_id,
                snapshot_name=target.snapshot_name,
                image_ref=target.image_ref,
                state=SnapshotState.ERROR,
                error_reason=f"cannot snapshot sandbox {job.sandbox_id}: {failure.reason}",
            )
        await self._bus.publish(
            channels.SNAPSHOT_EVENTS,
            event,
            msg_id=f"{job.job_id}:{event.state}",
            snapshot=kv_safe(target.snapshot_name),
        )

    async def _remove_container_and_disk(self, sandbox_id: str) -> None:
        await self._daemons.close(sandbox_id)
        await self._engine.remove(container_name(sandbox_id))
        await self._egress.remove(sandbox_id)
        self._forget_owner(sandbox_id)
        # After the container: its writable layer lives on the disk until the engine has let go of it.
        await asyncio.to_thread(self._disks.remove, sandbox_id)
        await asyncio.to_thread(self._volumes.release, sandbox_id)  # the stop released them; idempotent
        socket_dir = sandbox_socket_dir(self._settings, sandbox_id)
        await asyncio.to_thread(unmount_socket_dir, socket_dir)
        await asyncio.to_thread(_remove_tree, socket_dir)

    def _forget_owner(self, sandbox_id: str) -> None:
        """The container is gone: a later one of this sandbox (a restored archive) carries its own label."""
        if self._owners is not None:
            self._owners.forget(sandbox_id)

    async def _destroy(self, job: RunnerJob) -> None:
        await self._daemons.close(job.sandbox_id)
        await self._engine.remove(container_name(job.sandbox_id))
        await self._egress.remove(job.sandbox_id)
        self._forget_owner(job.sandbox_id)
        # After the container: its writable layer lives on the disk until the engine has let go of it.
        await asyncio.to_thread(self._disks.remove, job.sandbox_id)
        await asyncio.to_thread(self._volumes.release, job.sandbox_id)
        socket_dir = sandbox_socket_dir(self._settings, job.sandbox_id)
        await asyncio.to_thread(unmount_socket_dir, socket_dir)
        await asyncio.to_thread(_remove_tree, socket_dir)
        # Only our own route: if the sandbox has since been placed on another runner, that route is not ours.
        route = await kv_get(self._routes, job.sandbox_id, SandboxRoute)
        if route is None or route.runner_id == self._runner_id:
            await kv_delete(self._routes, job.sandbox_id)
        await self._publish_event(job, SandboxState.DESTROYED)

    async def _report(
        self,
        job: RunnerJob,
        state: SandboxState,
        *,
        error_reason: str | None = None,
        daemon_version: str | None = None,
        image: str | None = None,
    ) -> None:
        # Route first: whoever reacts to `started` (the SDK via the API) must find the proxy route in place.
        route = SandboxRoute(
            sandbox_id=job.sandbox_id,
            organization_id=job.spec.organization_id,
            runner_id=self._runner_id,
            runner_url=self._settings.effective_runner_url,
            state=state,
        )
        await kv_put(self._routes, job.sandbox_id, route)
        await self._publish_event(
            job, state, error_reason=error_reason, daemon_version=daemon_version, image=image
        )

    async def _publish_event(
        self,
        job: RunnerJob,
        state: SandboxState,
        *,
        error_reason: str | None = None,
        daemon_version: str | None = None,
        image: str | None = None,
    ) -> None:
        event = SandboxStateEvent(
            sandbox_id=job.sandbox_id,
            organization_id=job.spec.organization_id,
            state=state,
            error_reason=error_reason,
            runner_id=self._runner_id,
            daemon_version=daemon_version,
            source=EVENT_SOURCE,
            image=image,
        )
        # A redelivered job that reaches the same outcome publishes nothing new (JetStream de-duplication).
        await self._bus.publish(
            channels.SANDBOX_EVENTS, event, msg_id=f"{job.job_id}:{state}", sandbox_id=job.sandbox_id
        )


# The size of a sandbox's user namespace (its root is the first host id of the range).
USERNS_SIZE = 65536


def shift_down(upper: Path, root: RootIds) -> list[tuple[str, bool, bool]]:
    """Give every entry of the layer `upper` the sandbox's own ids instead of the host's (root's host id
    becomes 0); returns what changed, as (path, uid shifted, gid shifted), for `shift_up`. Links are not
    followed."""
    changed: list[tuple[str, bool, bool]] = []
    if not upper.is_dir():
        return changed
    for directory, dirnames, filenames in os.walk(upper):
        for name in [".", *dirnames, *filenames]:
            path = directory if name == "." else os.path.join(directory, name)
            info = os.lstat(path)
            shift_uid = root.uid <= info.st_uid < root.uid + USERNS_SIZE
            shift_gid = root.gid <= info.st_gid < root.gid + USERNS_SIZE
            if not shift_uid and not shift_gid:
                continue
            _chown_keeping_mode(
                path,
                info,
                info.st_uid - root.uid if shift_uid else info.st_uid,
                info.st_gid - root.gid if shift_gid else info.st_gid,
            )
            changed.append((path, shift_uid, shift_gid))
    return changed


def shift_up(changed: list[tuple[str, bool, bool]], root: RootIds) -> None:
    """Undo `shift_down`: the layer's entries get their host ids back."""
    for path, shift_uid, shift_gid in changed:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        _chown_keeping_mode(
            path,
            info,
            info.st_uid + root.uid if shift_uid else info.st_uid,
            info.st_gid + root.gid if shift_gid else info.st_gid,
        )


def _chown_keeping_mode(path: str, info: os.stat_result, uid: int, gid: int) -> None:
    os.lchown(path, uid, gid)
    if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o6000:
        os.chmod(path, info.st_mode & 0o7777)  # chown clears setuid and setgid bits


def _split_ref(reference: str) -> tuple[str, str]:
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:
        return reference, "latest"
    return repository, tag


def registry_reference(registry: str, image_ref: str) -> tuple[str, str]:
    """Where `image_ref` lives in the platform registry: (repository, tag); as the builder names it."""
    name, tag = _split_ref(image_ref)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest  # drop the source registry host; keep the path
    return f"{registry}/snapshots/{name}", tag


# Read by each daemon worker at its start (tidepool_daemon.supervisor.ENV_FILE_NAME).
DAEMON_ENV_FILE = "env.json"


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    """Write `env` as JSON to `path` atomically, 0600, owned like its folder (the sandbox's root)."""
    owner = path.parent.stat()
    staging = path.with_name(f".{path.name}.tmp")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(env, handle)
    os.chown(staging, owner.st_uid, owner.st_gid, follow_symlinks=False)
    os.replace(staging, path)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_entry(path: Path) -> None:
    """Whatever the sandbox left at `path` (a socket, a link, a folder) goes; links are not followed."""
    try:
        path.unlink(missing_ok=True)
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)
