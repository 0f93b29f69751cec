"""A cgroup per build that bounds its processes: podman's build API has no pids limit, but takes a cgroup.

Every RUN step of a build runs in the leaf `/<parent>/<build>/step` (the build API's `cgroupparent` is the
step's own cgroup path; the OCI runtime creates the leaf per step and removes it after). The builder makes
`/<parent>/<build>` beforehand with `pids.max`, which the kernel enforces over everything below it, so a
fork bomb in one build hits its own limit (EAGAIN) and not the host's; memory and CPU are set on the leaf
by the runtime from the build's other parameters. Afterwards the builder removes the build's directories
in every hierarchy (the runtime creates the intermediate ones everywhere and leaves them behind).

cgroup v1 (this host): `pids.max` in the pids hierarchy. cgroup v2: `pids.max` in the unified tree, with the
pids, memory and cpu controllers enabled for the children. Blocking file I/O: call from a thread.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("tidepool.builder.cgroup")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "tidepool-builds"
STEP = "step"
V2_CONTROLLERS = ("pids", "memory", "cpu")
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class BuildCgroupError(RuntimeError):
    """The build's cgroup could not be made (e.g. a read-only cgroup filesystem); the message says why."""


@dataclass(frozen=True)
class BuildCgroup:
    """One build's cgroup; `step_path` is the build API's `cgroupparent`."""

    root: Path
    key: str

    @property
    def step_path(self) -> str:
        return f"/{PARENT}/{self.key}/{STEP}"

    def _unified(self) -> bool:
        return (self.root / "cgroup.controllers").exists()

    def _pids_dir(self) -> Path:
        base = self.root if self._unified() else self.root / "pids"
        return base / PARENT / self.key

    def create(self, pids_max: int) -> None:
        """Make the build's cgroup with `pids.max` = `pids_max`. Raises BuildCgroupError."""
        if not _KEY.match(self.key):
            raise BuildCgroupError(f"build cgroup name {self.key!r} is not a plain name")
        build_dir = self._pids_dir()
        try:
            if self._unified():
                self._enable_controllers(build_dir.parent)
            build_dir.mkdir(parents=True, exist_ok=True)
            if self._unified():
                self._enable_controllers(build_dir)
            (build_dir / "pids.max").write_text(f"{pids_max}\n")
        except OSError as error:
            raise BuildCgroupError(f"cannot make the build's cgroup {build_dir}: {error}") from error

    def _enable_controllers(self, directory: Path) -> None:
        """cgroup v2: children of `directory` (and so the step) get these controllers."""
        directory.mkdir(parents=True, exist_ok=True)
        wanted = " ".join(f"+{name}" for name in V2_CONTROLLERS)
        (directory / "cgroup.subtree_control").write_text(wanted)

    def remove(self) -> None:
        """Remove the build's directories in every hierarchy (best effort: a busy one stays, logged)."""
        try:
            unified = self._unified()
            hierarchies = [self.root] if unified else [path for path in self.root.iterdir() if path.is_dir()]
        except OSError:
            return  # no cgroup filesystem here: nothing was made
        for hierarchy in hierarchies:
            build_dir = hierarchy / PARENT / self.key
            for directory in (build_dir / STEP, build_dir):
                if directory.is_dir():
                    try:
                        os.rmdir(directory)
                    except OSError as error:
                        log.warning("build_cgroup.not_removed", path=str(directory), error=str(error))
            with contextlib.suppress(OSError):
                os.rmdir(hierarchy / PARENT)  # only when no other build uses it


def sweep_stale(root: Path = CGROUP_ROOT) -> None:
    """Remove build cgroups a stopped builder left behind (at builder start, before any build: a directory
    still in use refuses removal and stays)."""
    try:
        hierarchies = (
            [root] if (root / "cgroup.controllers").exists() else [p for p in root.iterdir() if p.is_dir()]
        )
    except OSError:
        return
    for hierarchy in hierarchies:
        parent = hierarchy / PARENT
        with contextlib.suppress(OSError):
            for build_dir in [path for path in parent.iterdir() if path.is_dir()]:
                with contextlib.suppress(OSError):
                    if (build_dir / STEP).is_dir():
                        os.rmdir(build_dir / STEP)
                    os.rmdir(build_dir)
            os.rmdir(parent)
