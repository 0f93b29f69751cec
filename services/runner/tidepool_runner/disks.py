"""Each sandbox's disk: its own ext4 filesystem of `disk_gib`, holding the container's writable layer.

Why: the engine can cap a writable layer only with `StorageOpt size` (overlay on XFS with project quotas),
which this kind of host lacks, and an uncapped layer lets one sandbox fill the disk that also holds the
database, NATS and the registry (issue #7). So the runner gives every sandbox a sparse image file,
formatted ext4 and loop-mounted under `Settings.disks_dir`, and after the engine created the container
(before it starts it) replaces the container's overlay upper and work dirs by symbolic links to the
disk's `upper/` and `work/`. Links, not bind mounts: overlayfs wants both dirs on one mount, and links
let the engine delete the layer as usual. Then

- a writer inside gets `ENOSPC` at the sandbox's own limit, never the host's;
- `df /` inside shows the configured size (overlayfs reports its upper filesystem);
- the image is sparse and mounted with `discard`, so the host pays only for what is used, and deleted
  files give their blocks back.

Formatting and mounting cost tens of milliseconds (more on a busy host), so a few disks of each size in
recent demand are kept formatted and mounted ahead of time under `pool/`; a create takes one with two
renames (the image file, and the mount moved with `MS_MOVE`) and a refill follows in the background.

Every step is idempotent (a redelivered job, a runner restarted half-way, a host reboot that dropped the
mounts: attaching again converges). Blocking calls (mkfs, mount): run through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog

from tidepool_runner.engine import SandboxFailedError

log = structlog.get_logger("tidepool.runner.disks")

GIB = 1024**3
# Set once the writable layer's first content has been copied in: later attaches must not copy again.
INITIALIZED_MARKER = ".tidepool-disk"
# No reserved blocks (the whole size is the user's); inode tables and the journal are initialised lazily
# by the kernel, so formatting a sparse file takes milliseconds whatever its size.
MKFS_ARGS = ("-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard")
MOUNT_OPTIONS = "loop,discard,noatime"
# A filesystem smaller than this share of its disk's size was not grown (ext4's metadata takes a few %).
GROWN_ENOUGH = 0.9
# Ready disks kept per size, and how many recent creates decide which sizes are worth keeping ready.
POOL_DISKS_PER_SIZE = 2
POOL_RECENT_CREATES = 20
MS_MOVE = 8192
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class DiskPaths:
    image: Path  # <disks_dir>/<sandboxId>.img, the sparse file
    mount: Path  # <disks_dir>/<sandboxId>/, where the filesystem is mounted

    @property
    def upper(self) -> Path:
        return self.mount / "upper"

    @property
    def work(self) -> Path:
        return self.mount / "work"


class SandboxDisks:
    """Attach, detach and remove sandbox disks under `root` (root-only, 0700)."""

    def __init__(self, root: Path, default_size_gib: int = 3) -> None:
        self._root = root
        self._pool_root = root / "pool"
        self._lock = threading.Lock()
        self._ready: dict[int, list[DiskPaths]] = {}
        self._recent_sizes: deque[int] = deque([default_size_gib], maxlen=POOL_RECENT_CREATES)

    def paths(self, sandbox_id: str) -> DiskPaths:
        return DiskPaths(image=self._root / f"{sandbox_id}.img", mount=self._root / sandbox_id)

    def attach(self, sandbox_id: str, size_gib: int, upper_dir: str, work_dir: str) -> None:
        """Make the container's layer dirs (`upper_dir`, `work_dir`, from the engine's inspect) live on the
        sandbox's disk of `size_gib` GiB, creating the disk on first use. Raises SandboxFailedError."""
        if not upper_dir or not work_dir:
            raise SandboxFailedError("the engine reported no overlay layer for the sandbox container")
        disk = self.paths(sandbox_id)
        try:
            self._ensure_roots()
            if not disk.image.exists():
                with self._lock:
                    self._recent_sizes.append(size_gib)
                if not self._claim_ready(disk, size_gib):
                    _format(disk.image, size_gib)
            elif disk.image.stat().st_size < size_gib * GIB:
                _grow(disk.image, disk.mount, size_gib)  # resized while stopped: disks only grow
            self._mount(disk)
            if _filesystem_bytes(disk.mount) < size_gib * GIB * GROWN_ENOUGH:
                # The file has the size but its filesystem not (a grow interrupted before resize2fs):
                # finish it, or the sandbox would keep its old size for good.
                _grow(disk.image, disk.mount, size_gib)
                self._mount(disk)
            if not (disk.mount / INITIALIZED_MARKER).exists():
                _take_over_layer(Path(upper_dir), disk.upper, Path(work_dir), disk.work)
                (disk.mount / INITIALIZED_MARKER).touch(mode=0o600)
            for layer_dir, target in ((Path(upper_dir), disk.upper), (Path(work_dir), disk.work)):
                _point_at(layer_dir, target)
        except (OSError, subprocess.CalledProcessError) as error:
            raise SandboxFailedError(f"cannot attach the sandbox's disk: {_describe(error)}") from error

    @staticmethod
    def _mount(disk: DiskPaths) -> None:
        if not os.path.ismount(disk.mount):
            disk.mount.mkdir(mode=0o700, exist_ok=True)
            _run("mount", "-o", MOUNT_OPTIONS, str(disk.image), str(disk.mount))

    def detach(self, sandbox_id: str) -> None:
        """Unmount the disk (the container must be gone or stopped). Lazily: an overlay still being torn
        down keeps the filesystem until it is unmounted; the loop device goes with the last user (`loop`
        mounts are autoclear). A missing mount is fine."""
        disk = self.paths(sandbox_id)
        if os.path.ismount(disk.mount):
            _run("umount", "--lazy", str(disk.mount))

    def remove(self, sandbox_id: str) -> None:
        """Detach and delete the disk and everything on it."""
        self.detach(sandbox_id)
        disk = self.paths(sandbox_id)
        disk.image.unlink(missing_ok=True)
        if disk.mount.exists() and not os.path.ismount(disk.mount):
            shutil.rmtree(disk.mount, ignore_errors=True)

    # -- the pool of ready disks ----------------------------------------------------------------------------

    def _claim_ready(self, disk: DiskPaths, size_gib: int) -> bool:
        """Give `disk` a ready (formatted, mounted) disk of the size from the pool; False when none is."""
        with self._lock:
            ready = self._ready.get(size_gib)
            if not ready:
                return False
            taken = ready.pop()
        try:
            taken.image.rename(disk.image)  # the loop device holds the inode: a rename is safe
            disk.mount.mkdir(mode=0o700, exist_ok=True)
            _move_mount(taken.mount, disk.mount)
            taken.mount.rmdir()
        except OSError:
            # Fall back to a disk of its own; what is left of the ready one is unmounted and deleted.
            _unmount_quietly(taken.mount)
            _unmount_quietly(disk.mount)
            disk.image.unlink(missing_ok=True)
            taken.image.unlink(missing_ok=True)
            return False
        return True

    def refill_pool(self) -> int:
        """Prepare ready disks for the sizes of recent creates; returns how many were made. Blocking."""
        with self._lock:
            wanted = sorted(set(self._recent_sizes))
            missing = {size: POOL_DISKS_PER_SIZE - len(self._ready.get(size, [])) for size in wanted}
            unwanted = {size: disks for size, disks in self._ready.items() if size not in wanted}
            for size in unwanted:
                del self._ready[size]
        for disks in unwanted.values():
            for disk in disks:
                _discard(disk)
        made = 0
        for size, count in missing.items():
            for _ in range(count):
                disk = self._prepare_ready(size)
                with self._lock:
                    self._ready.setdefault(size, []).append(disk)
                made += 1
        return made

    def _ensure_roots(self) -> None:
        # Root-only: the images hold every sandbox's files. mkdir's mode does not reach parents it makes.
        for directory in (self._root, self._pool_root):
            directory.mkdir(mode=0o700, exist_ok=True)
            directory.chmod(0o700)

    def _prepare_ready(self, size_gib: int) -> DiskPaths:
        self._ensure_roots()
        token = f"{size_gib}g-{secrets.token_hex(6)}"
        disk = DiskPaths(image=self._pool_root / f"{token}.img", mount=self._pool_root / token)
        _format(disk.image, size_gib)
        disk.mount.mkdir(mode=0o700)
        _run("mount", "-o", MOUNT_OPTIONS, str(disk.image), str(disk.mount))
        return disk

    def discard_pool(self) -> None:
        """Unmount and delete every ready disk, also those a previous runner left (at start and stop)."""
        with self._lock:
            self._ready.clear()
        if not self._pool_root.is_dir():
            return
        for image in self._pool_root.glob("*.img"):
            _discard(DiskPaths(image=image, mount=image.with_suffix("")))

    def disk_ids(self) -> set[str]:
        """Sandbox ids that have a disk here (for cleaning up after containers that vanished)."""
        if not self._root.is_dir():
            return set()
        return {path.stem for path in self._root.glob("*.img")}


def _format(image: Path, size_gib: int) -> None:
    partial = image.with_name(image.name + ".partial")
    partial.unlink(missing_ok=True)
    with open(partial, "wb") as handle:
        handle.truncate(size_gib * GIB)
    _run("mkfs.ext4", *MKFS_ARGS, str(partial))
    partial.rename(image)


def _filesystem_bytes(mount: Path) -> int:
    """The mounted filesystem's size (its blocks, before ext4's own overhead is taken off by `df`)."""
    info = os.statvfs(mount)
    return info.f_blocks * info.f_frsize


def _grow(image: Path, mount: Path, size_gib: int) -> None:
    """Grow a stopped sandbox's disk image and its ext4 filesystem to `size_gib` (sparse: nothing is
    written). Offline: the disk is unmounted first (the caller mounts it again), because growing a mounted
    ext4 needs CAP_SYS_RESOURCE, which a runner in a container may lack."""
    if os.path.ismount(mount):
        _run("umount", str(mount))
    with open(image, "r+b") as handle:
        handle.truncate(size_gib * GIB)
    # resize2fs insists on a freshly checked filesystem; -p: repair only what is safe without asking.
    subprocess.run(["e2fsck", "-f", "-p", str(image)], check=False, capture_output=True)
    _run("resize2fs", str(image))


def _take_over_layer(old_upper: Path, new_upper: Path, old_work: Path, new_work: Path) -> None:
    """Copy what the engine already put in the layer onto the disk, with the same owners and modes (the
    layer's root belongs to the sandbox's root, a uid of its user namespace)."""
    shutil.rmtree(new_upper, ignore_errors=True)
    shutil.rmtree(new_work, ignore_errors=True)
    new_upper.mkdir()
    new_work.mkdir()
    if old_upper.is_dir() and not old_upper.is_symlink() and any(old_upper.iterdir()):
        # cp -a keeps owners, modes, xattrs and overlay whiteouts (device nodes) exactly.
        _run("cp", "-a", f"{old_upper}/.", str(new_upper))
    for old, new in ((old_upper, new_upper), (old_work, new_work)):
        info = old.stat() if old.exists() else old.parent.stat()
        os.chown(new, info.st_uid, info.st_gid)
        os.chmod(new, info.st_mode & 0o7777)


def _point_at(layer_dir: Path, target: Path) -> None:
    """Make `layer_dir` a link to `target`, whatever it is now (the engine's empty dir, a link already)."""
    if layer_dir.is_symlink():
        if os.readlink(layer_dir) == str(target):
            return
        layer_dir.unlink()
    elif layer_dir.exists():
        shutil.rmtree(layer_dir)
    partial = layer_dir.with_name(layer_dir.name + ".link")
    partial.unlink(missing_ok=True)
    partial.symlink_to(target)
    partial.rename(layer_dir)


def _move_mount(source: Path, target: Path) -> None:
    """mount(2) with MS_MOVE: one syscall instead of unmounting and mounting again."""
    if _libc.mount(str(source).encode(), str(target).encode(), None, MS_MOVE, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"moving the mount {source} to {target}: {os.strerror(code)}")


def _unmount_quietly(target: Path) -> None:
    if os.path.ismount(target):
        subprocess.run(["umount", "--lazy", str(target)], capture_output=True, check=False)


def _discard(disk: DiskPaths) -> None:
    _unmount_quietly(disk.mount)
    with contextlib.suppress(OSError):
        disk.mount.rmdir()
    disk.image.unlink(missing_ok=True)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _describe(error: BaseException) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        return f"{error.cmd[0]} failed: {(error.stderr or '').strip() or f'exit {error.returncode}'}"
    return str(error)
