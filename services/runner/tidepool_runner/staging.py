"""The runner's private tmpfs (`RunnerSettings.runtime_dir`): all a sandbox sees of the host comes from here.

Layout: `daemon/` (a read-only copy of the toolbox daemon), `pyrt/` (the Python runtime it runs on, see
toolbox_runtime.py), `ca-bundle.crt` (the configured CA bundle),
`seccomp.json` (the sandboxes' seccomp profile, which the engine reads when it creates a container) and
`sockets/<sandboxId>/` (one folder per sandbox, owned by that sandbox's root, holding its toolbox socket).

Why a tmpfs of its own: a bind mount shows its source path inside the sandbox (`/proc/self/mountinfo`),
relative to the source's filesystem; from here that is `/daemon` or `/sockets/<id>`, never the host's
directory layout. The mount is made once and kept across runner restarts, because running sandboxes hold
their sockets in it; `sockets/` is root-only (0700), so no other host user can reach any toolbox.
"""

from __future__ import annotations

import compileall
import ctypes
import functools
import os
import py_compile
import shutil
import subprocess
import time
from pathlib import Path

import structlog

from tidepool_runner.container_config import (
    staged_ca_bundle,
    staged_daemon_dir,
    staged_runtime_dir,
    staged_seccomp_profile,
)
from tidepool_runner.seccomp import SHIPPED_PROFILE, UNCONFINED_VALUES, validate_profile
from tidepool_runner.toolbox_runtime import stage_runtime
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.staging")

# A cap, not a reservation: the daemon (~1 MB a copy) and its Python runtime (~70 MB, shared by every
# sandbox's page cache) with room for copies still mounted by older sandboxes.
RUNTIME_TMPFS_SIZE = "512m"
RUNTIME_TMPFS_OPTIONS = f"mode=0711,size={RUNTIME_TMPFS_SIZE},nosuid,nodev"
# Each sandbox's toolbox folder is a tmpfs of its own, so a sandbox's root filling it (it may write there)
# fills nothing of its neighbours'. Room for the socket and little else.
SOCKET_TMPFS_SIZE = "256k"
SOCKET_TMPFS_INODES = 64
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MNT_DETACH = 0x2
# What the daemon needs of its source tree; caches and tests stay out.
DAEMON_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")


def prepare_runtime_dir(settings: RunnerSettings) -> None:
    """Mount the tmpfs if it is not mounted yet, then (re)stage the daemon, the CA bundle and the seccomp
    profile. Idempotent.

    Raises OSError / CalledProcessError when the tmpfs cannot be mounted (the runner must run as root),
    ValueError when the configured seccomp profile is refused (see seccomp_profile_text).
    """
    # Checked first: a refused profile stops the runner before anything is mounted.
    profile = seccomp_profile_text(settings)
    runtime = settings.runtime_dir
    runtime.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(runtime):
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", RUNTIME_TMPFS_OPTIONS, "tidepool-runtime", str(runtime)],
            check=True,
            capture_output=True,
        )
        log.info("staging.mounted", path=str(runtime))
    else:
        # Mounted by an older runner with a smaller cap: raise it (keeps the contents).
        subprocess.run(
            ["mount", "-o", f"remount,size={RUNTIME_TMPFS_SIZE}", str(runtime)],
            check=True,
            capture_output=True,
        )
    settings.sockets_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(settings.sockets_dir, 0o700)
    if stage_runtime(staged_runtime_dir(settings)):
        log.info("staging.runtime_staged", path=str(staged_runtime_dir(settings)))
    _remove_unmounted_copies(staged_runtime_dir(settings))
    _stage_daemon(settings.daemon_dir, staged_daemon_dir(settings))
    if settings.ca_bundle:
        _replace_file(Path(settings.ca_bundle), staged_ca_bundle(settings))
    _write_file(profile, staged_seccomp_profile(settings))


def seccomp_profile_text(settings: RunnerSettings) -> str:
    """The sandbox seccomp profile to stage: `Settings.sandbox_seccomp_profile` (a path), or the shipped one.

    Raises ValueError for `unconfined` (no filter at all) or a file that is not a seccomp profile, OSError
    when the file cannot be read: the runner then refuses to start rather than run sandboxes unfiltered.
    """
    configured = settings.sandbox_seccomp_profile.strip()
    if configured.lower() in UNCONFINED_VALUES:
        raise ValueError(
            f"TIDEPOOL_SANDBOX_SECCOMP_PROFILE={configured!r} is refused: sandboxes always run with a seccomp"
            " filter (leave it empty for the shipped profile, or give the path of a JSON profile)"
        )
    path = Path(configured) if configured else SHIPPED_PROFILE
    text = path.read_text()
    try:
        validate_profile(text)
    except ValueError as error:
        raise ValueError(f"TIDEPOOL_SANDBOX_SECCOMP_PROFILE: {path}: {error}") from None
    return text


def mount_socket_dir(path: Path, uid: int, gid: int) -> None:
    """Make `path` (an existing folder) a private tmpfs owned by `uid:gid`, mode 0700; a no-op when it is
    one already (a restart). mount(2) directly: this is on every start's path. Raises OSError."""
    if os.path.ismount(path):
        return
    options = f"size={SOCKET_TMPFS_SIZE},nr_inodes={SOCKET_TMPFS_INODES},mode=0700,uid={uid},gid={gid}"
    result = _libc().mount(
        b"tidepool-toolbox",
        os.fsencode(path),
        b"tmpfs",
        _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
        options.encode(),
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount tmpfs on {path}: {os.strerror(errno)}")


def unmount_socket_dir(path: Path) -> None:
    """Detach the folder's tmpfs if it has one (lazily: a dying container may still hold it)."""
    if os.path.ismount(path):
        _libc().umount2(os.fsencode(path), _MNT_DETACH)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _stage_daemon(source: Path, target: Path) -> None:
    """Swap in a fresh copy. Sandboxes started earlier keep the copy they mounted (a mount holds the
    directory, not its path) and their supervisors start new workers from it, so a replaced copy is renamed
    aside, never emptied; copies that no mount uses any more are removed."""
    fresh = target.with_name(target.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(source, fresh, ignore=DAEMON_COPY_IGNORE)
    _compile_bytecode(fresh)
    _make_world_readable(fresh)
    if target.exists():
        target.rename(target.with_name(f"{target.name}.replaced-{time.time_ns()}"))
    fresh.rename(target)
    _remove_unmounted_copies(target)


def _remove_unmounted_copies(target: Path) -> None:
    # A bind mount's root (field 4 of mountinfo, relative to its filesystem) follows renames: a replaced
    # copy still in use shows as `.../daemon.replaced-<n>` in some process's mount namespace.
    used: set[str] = set()
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            used.update(line.split()[3] for line in mountinfo.read_text().splitlines())
        except (OSError, IndexError):
            continue
    for aside in [*target.parent.glob(f"{target.name}.replaced-*"), target.with_name(target.name + ".old")]:
        if aside.exists() and not any(root.endswith(f"/{aside.name}") for root in used):
            shutil.rmtree(aside, ignore_errors=True)


def _compile_bytecode(root: Path) -> None:
    """Ship bytecode with the read-only copy, so the daemon's start does not compile ~9,000 lines each time
    (about a third of its start-up). Compiled by this interpreter, which is the one the daemon runs on in
    every sandbox (toolbox_runtime.py). `unchecked-hash` because the copy's timestamps mean nothing inside
    the sandbox and the files never change under a mount (a new daemon is staged as a fresh copy)."""
    compileall.compile_dir(
        root,
        quiet=1,
        workers=1,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )


def _replace_file(source: Path, target: Path) -> None:
    fresh = target.with_name(target.name + ".new")
    shutil.copyfile(source, fresh)
    fresh.chmod(0o644)
    fresh.replace(target)


def _write_file(text: str, target: Path) -> None:
    fresh = target.with_name(target.name + ".new")
    fresh.write_text(text)
    fresh.chmod(0o644)
    fresh.replace(target)


def _make_world_readable(root: Path) -> None:
    # Inside a user namespace the host's root is `nobody`: only "other" permission bits apply.
    for directory, _dirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
