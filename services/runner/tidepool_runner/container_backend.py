"""Today's sandbox backend: containers on the runner's own container engine (Podman, through its Docker API;
engine.py), each with its own user namespace, a disk of its own for its writable layer (disks.py), FUSE
volume mounts (volumes.py), per-sandbox egress rules on the host firewall (egress.py) and a toolbox daemon
reached over a verified unix socket in a folder the sandbox's root owns (daemon_connections.py).

It implements `backend.SandboxBackend`; the job handlers (jobs.py) call nothing else. Every method
converges: a job redelivered after a crash finds the container where the first attempt left it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from pathlib import Path

import aiohttp
import structlog

from tidepool_contracts.models import IsolationKind, RunnerCapabilities, SandboxMetricsSample, SandboxSpec
from tidepool_contracts.states import SandboxState
from tidepool_runner.account_files import add_missing_account_files
from tidepool_runner.backend import HostedSandbox, SandboxFailedError, SnapshotImage
from tidepool_runner.container_config import (
    CPU_LABEL,
    GIB,
    MEMORY_LABEL,
    ORGANIZATION_LABEL,
    SANDBOX_LABEL,
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
    ContainerSummary,
    EngineUnavailableError,
    RootIds,
)
from tidepool_runner.owners import ClaimedOwners
from tidepool_runner.resource_samples import ContainerStats
from tidepool_runner.staging import mount_socket_dir, unmount_socket_dir
from tidepool_runner.volumes import VolumeMountError, VolumeMounts
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.backend")

DAEMON_START_TIMEOUT_SECONDS = 60.0
# The daemon's log line with the one-line reason it can never serve (tidepool_daemon.supervisor.FATAL_MARKER).
DAEMON_FATAL_MARKER = "daemon cannot start: "
# The socket is probed often while a daemon usually comes up (within DAEMON_FAST_PROBE_SECONDS), then less
# and less: many sandboxes starting at once would otherwise cost the runner's one core more than their
# starts do.
DAEMON_PROBE_INTERVAL_SECONDS = 0.01
DAEMON_FAST_PROBE_SECONDS = 0.4
DAEMON_PROBE_MAX_INTERVAL_SECONDS = 0.1
# Checking the container while waiting costs an engine call, so it happens less often than probing the socket.
CONTAINER_CHECK_INTERVAL_SECONDS = 0.25
STOP_TIMEOUT_SECONDS = 10

# Engine container states -> the sandbox state a route reports.
STATE_BY_CONTAINER_STATE: dict[str, SandboxState] = {
    "running": SandboxState.STARTED,
    "paused": SandboxState.STARTED,
    "created": SandboxState.STOPPED,
    "configured": SandboxState.STOPPED,
    "exited": SandboxState.STOPPED,
    "stopped": SandboxState.STOPPED,
}

# What this backend can do: everything the platform offers today, except GPUs.
CONTAINER_ENGINE_CAPABILITIES = RunnerCapabilities(
    isolation=IsolationKind.CONTAINER,
    live_resize=True,
    archive=True,
    snapshots=True,
    network_policies=True,
    domain_allow_lists=True,
    volumes=True,
    gpu=False,
)


def _int_label(container: ContainerSummary, label: str) -> int:
    try:
        return int(container.labels.get(label, "0"))
    except ValueError:
        return 0


def hosted_sandbox(container: ContainerSummary) -> HostedSandbox:
    """A sandbox container as the runner's inventory sees it (its labels carry its id, owner and size)."""
    return HostedSandbox(
        sandbox_id=container.labels.get(SANDBOX_LABEL, ""),
        organization_id=container.labels.get(ORGANIZATION_LABEL, ""),
        state=STATE_BY_CONTAINER_STATE.get(container.state, SandboxState.ERROR),
        running=container.state == "running",
        cpu=_int_label(container, CPU_LABEL),
        memory_gib=_int_label(container, MEMORY_LABEL),
    )


class ContainerEngineBackend:
    """`SandboxBackend` on the container engine (see the module doc)."""

    def __init__(
        self,
        *,
        settings: RunnerSettings,
        runner_id: str,
        engine: ContainerEngine,
        daemons: DaemonConnections,
        disks: SandboxDisks,
        volumes: VolumeMounts | None = None,
        egress: EgressPolicies | None = None,
        owners: ClaimedOwners | None = None,
    ) -> None:
        self._settings = settings
        self._runner_id = runner_id
        self._engine = engine
        self._daemons = daemons
        self._disks = disks
        self._volumes = volumes or VolumeMounts(settings)
        self._egress = egress or EgressPolicies(settings)
        self._owners = owners
        self._stats = ContainerStats(runner_id=runner_id, engine=engine, disks=disks)

    @property
    def capabilities(self) -> RunnerCapabilities:
        return CONTAINER_ENGINE_CAPABILITIES

    @property
    def toolbox(self) -> DaemonConnections:
        return self._daemons

    @property
    def engine(self) -> ContainerEngine:
        return self._engine

    @property
    def egress(self) -> EgressPolicies:
        """The sandboxes' own network policies (their rules are removed when they stop)."""
        return self._egress

    async def close(self) -> None:
        await self._daemons.close_all()
        await self._engine.close()

    # --- SandboxBackend ------------------------------------------------------------------------------

    async def list_sandboxes(self) -> list[HostedSandbox]:
        return [hosted_sandbox(container) for container in await self._engine.list_sandboxes()]

    async def stats(self) -> list[SandboxMetricsSample]:
        return await self._stats.collect()

    async def adopt(self) -> list[HostedSandbox]:
        """The sandbox containers on this engine; the disks of sandboxes whose container is gone (a destroy
        interrupted between removing the container and its disk) are deleted first."""
        hosted = await self.list_sandboxes()
        for orphan in self._disks.disk_ids() - {sandbox.sandbox_id for sandbox in hosted}:
            log.info("inventory.orphan_disk_removed", sandbox_id=orphan)
            await asyncio.to_thread(self._disks.remove, orphan)
        return hosted

    async def start(self, spec: SandboxSpec) -> str:
        return await self._ensure_running(spec)

    async def claim(self, spec: SandboxSpec) -> str:
        """A warm-pool sandbox now belongs to `spec.organization_id`: its daemon gets the claimer's env
        (no restart). A container that is not running any more is brought up as a START would (which
        applies the env too)."""
        # A daemon that answers runs in a running container: no engine call on this path.
        version = await self._daemons.probe_version(spec.sandbox_id)
        if version is None:
            return await self._ensure_running(spec)
        await self._apply_claimed_env(spec)
        return version

    async def recover(self, spec: SandboxSpec) -> str:
        """Restart the sandbox from a recoverable error (e.g. a daemon that could not be restarted): the
        container goes down (killed: it may be wedged) and comes up again, its disk and files kept."""
        status = await self._engine.inspect(container_name(spec.sandbox_id))
        if status is not None and (status.running or status.paused):
            await self._engine.kill(status.container_id)
        await self._daemons.close(spec.sandbox_id)
        return await self._ensure_running(spec)

    async def stop(self, spec: SandboxSpec, *, force: bool = False) -> None:
        status = await self._engine.inspect(container_name(spec.sandbox_id))
        if status is None:
            raise SandboxFailedError("container missing")
        if status.running or status.paused:
            if force:
                await self._engine.kill(status.container_id)
            else:
                await self._engine.stop(status.container_id, timeout_seconds=STOP_TIMEOUT_SECONDS)
        await self._daemons.close(spec.sandbox_id)
        await self._egress.remove(spec.sandbox_id)
        await asyncio.to_thread(self._volumes.release, spec.sandbox_id)

    async def delete(self, sandbox_id: str) -> None:
        await self._daemons.close(sandbox_id)
        await self._engine.remove(container_name(sandbox_id))
        await self._egress.remove(sandbox_id)
        self._forget_owner(sandbox_id)
        # After the container: its writable layer lives on the disk until the engine has let go of it.
        await asyncio.to_thread(self._disks.remove, sandbox_id)
        await asyncio.to_thread(self._volumes.release, sandbox_id)  # a stop released them; idempotent
        socket_dir = sandbox_socket_dir(self._settings, sandbox_id)
        await asyncio.to_thread(unmount_socket_dir, socket_dir)
        await asyncio.to_thread(_remove_tree, socket_dir)

    async def resize(self, spec: SandboxSpec) -> bool:
        """Grow a running sandbox's cpu and memory (disk only changes while stopped, at the next start)."""
        status = await self._engine.inspect(container_name(spec.sandbox_id))
        if status is None or not status.running:
            return False
        await self._engine.update_resources(status.container_id, spec.cpu, spec.memory_gib * GIB)
        return True

    async def update_network(self, spec: SandboxSpec) -> None:
        """A running sandbox's egress policy changed: apply it now (no restart). A stopped one gets it at
        its next start."""
        status = await self._engine.inspect(container_name(spec.sandbox_id))
        if status is None or not (status.running or status.paused):
            return
        await self._egress.converge(spec, status.addresses)

    async def archive(self, spec: SandboxSpec, archive_id: str) -> str:
        """Commit the sandbox's filesystem (files, installed packages) to an image, push it to the platform
        registry and remove its container and disk: the runner keeps nothing of it. Its next START
        recreates the container from that image on whichever runner the scheduler picks."""
        local_ref, final_ref = self._archive_ref(spec.sandbox_id, archive_id)
        status = await self._engine.inspect(container_name(spec.sandbox_id))
        if status is not None:
            if status.running or status.paused:
                await self._engine.stop(status.container_id, timeout_seconds=STOP_TIMEOUT_SECONDS)
                status = await self._engine.inspect(status.container_id) or status
            await self._daemons.close(spec.sandbox_id)
            final_ref = await self._commit(spec, status, local_ref)
        # else: a redelivered job whose first attempt committed and removed the container already.
        await self.delete(spec.sandbox_id)
        return final_ref

    async def snapshot(self, spec: SandboxSpec, image_ref: str) -> SnapshotImage:
        status = await self._engine.inspect(container_name(spec.sandbox_id))
        if status is None:
            raise SandboxFailedError("the sandbox has no container on its runner")
        reference = await self._commit(spec, status, image_ref)
        return SnapshotImage(reference=reference, size_bytes=await self._engine.image_size(reference))

    # --- the container engine's own steps -------------------------------------------------------------

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
            try:
                upper = self._disks.paths(spec.sandbox_id).upper
                await asyncio.to_thread(
                    add_missing_account_files, upper, status.lower_dirs, root.uid, root.gid
                )
            except OSError as error:
                raise SandboxFailedError(f"cannot prepare the image's /etc: {error}") from None
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
                log.warning("sandbox.daemon_not_ready", sandbox_id=sandbox_id, container_log=logs)
                raise SandboxFailedError(
                    f"sandbox daemon did not answer within {DAEMON_START_TIMEOUT_SECONDS:.0f} s"
                    + daemon_failure_reason(logs)
                )
            if now >= next_container_check:
                # An engine call each: rarer once the start is slow (the engine is busy with other starts).
                slow = now >= slow_after
                next_container_check = now + CONTAINER_CHECK_INTERVAL_SECONDS * (4 if slow else 1)
                status = await self._engine.inspect(container_id)
                if status is None or not status.running:
                    logs = await self._engine.log_tail(container_id) if status is not None else ""
                    exit_code = status.exit_code if status is not None else "unknown"
                    log.warning("sandbox.daemon_not_ready", sandbox_id=sandbox_id, container_log=logs)
                    raise SandboxFailedError(
                        f"sandbox container exited (code {exit_code}) before its daemon was ready"
                        + daemon_failure_reason(logs)
                    )
            await asyncio.sleep(interval)
            if now >= slow_after:
                interval = min(interval * 1.5, DAEMON_PROBE_MAX_INTERVAL_SECONDS)

    async def _commit(self, spec: SandboxSpec, status: ContainerStatus, local_ref: str) -> str:
        """Commit the sandbox's filesystem to `local_ref` and, with a platform registry, push it there and
        drop the local copy; returns the reference any runner can start it from."""
        if not status.running and not status.paused:
            # The writable layer lives on the sandbox's disk: make sure it is mounted and linked.
            await asyncio.to_thread(
                self._disks.attach, spec.sandbox_id, spec.disk_gib, status.upper_dir, status.work_dir
            )
        repository, tag = _split_ref(local_ref)
        # The layer holds the host's ids of the sandbox's user namespace, and the engine's commit copies them
        # as they are (its own mapping is the kernel's, on mount): an image made so would show every changed
        # file as `nobody`. So the layer is shifted to the sandbox's own ids for the copy and back after it,
        # with the sandbox frozen meanwhile if it runs.
        root = await self._engine.root_ids(status.container_id)
        upper = self._disks.paths(spec.sandbox_id).upper
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

    def _archive_ref(self, sandbox_id: str, archive_id: str) -> tuple[str, str]:
        """The archive's local name and where it ends up (deterministic: a redelivered job finds it)."""
        local_ref = f"localhost/tidepool/archive/{sandbox_id}:{archive_id}"
        registry = self._settings.registry_url
        if not registry:
            return local_ref, local_ref
        repository, tag = registry_reference(registry, local_ref)
        return local_ref, f"{repository}:{tag}"

    def _forget_owner(self, sandbox_id: str) -> None:
        """The container is gone: a later one of this sandbox (a restored archive) carries its own label."""
        if self._owners is not None:
            self._owners.forget(sandbox_id)


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


def daemon_failure_reason(logs: str) -> str:
    """The suffix of a start failure's reason from the container's last log lines: `: <reason>` from the
    daemon's own one-line reason when it logged one, else the last line that is no traceback frame, else
    `""`. One line either way: the whole tail (a traceback) goes to the runner's log, not the errorReason."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if DAEMON_FATAL_MARKER in line:
            return ": " + line.split(DAEMON_FATAL_MARKER, 1)[1]
    for line in reversed(lines):
        if not line.startswith(("File ", "Traceback", "^", "~")):
            return f"; last log line: {line[:500]}"
    return ""
