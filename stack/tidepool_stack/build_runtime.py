"""The OCI runtime of the build engine: runc, after two repairs Podman 4.3.1 misses in user-namespace builds.

The build engine (supervisor.Stack.start_build_engine) runs snapshot builds with `--userns=auto` on a store
of its own whose overlay driver copies and chowns layers per user namespace instead of idmapping them (the
idmapped path commits files with host-range owners, measured). On that path buildah 1.28 / containers/storage
1.43 still get two things wrong, both repaired here, around each RUN step, as the host's root:

- `create`: the root directory of the step's writable layer is owned by the host's uid 0 (storage never
  chowns a layer's top directory), i.e. by nobody inside the namespace: `mkdir /app` fails. It is given to
  the namespace's root, through the overlay mount so the mount sees it (the commit maps it back to 0);
- `delete` (the step has exited, its layer is not committed yet): overlayfs makes whiteouts (the record of a
  deleted file) with the mounter's credentials, the host's uid 0, which the commit cannot map into the
  namespace and drops: deletions were lost. Whiteouts (character devices 0:0 owned by host uid 0) of the
  step's upper directory are given to the namespace's root.

Containers without a user namespace, or not on overlay, are passed to runc untouched. Symlinks are never
followed (lchown), and nothing runs inside the container while these run (before its process, after it).

Run as `python -m tidepool_stack.build_runtime <runc arguments>` with TIDEPOOL_BUILD_RUNC naming runc;
standard library only (it runs once per runtime call).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

REAL_RUNTIME_ENV = "TIDEPOOL_BUILD_RUNC"


def namespace_root(config: dict[str, object]) -> tuple[int, int] | None:
    """Host (uid, gid) of the container's root, or None without a user namespace mapping it."""
    linux = config.get("linux")
    if not isinstance(linux, dict):
        return None
    ids = []
    for key in ("uidMappings", "gidMappings"):
        ids += [int(m["hostID"]) for m in linux.get(key) or [] if m.get("containerID") == 0]
    return (ids[0], ids[1]) if len(ids) == 2 else None


def overlay_upper_dir(mount_point: str, mountinfo: str | None = None) -> str | None:
    """The upperdir of the overlay mounted at `mount_point` (a bind mount of it counts), else None."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    upper = None
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or fields[4] != mount_point or tail[0] != "overlay":
            continue
        for option in tail[2].split(","):
            if option.startswith("upperdir="):
                upper = option.removeprefix("upperdir=")  # the last mount on that point wins
    return upper


def give_root_directory(rootfs: str, root: tuple[int, int]) -> bool:
    """Chown the container's `/` from the host's root to the namespace's root; True if it did."""
    info = os.lstat(rootfs)
    if info.st_uid != 0 or info.st_gid != 0 or not stat.S_ISDIR(info.st_mode):
        return False
    os.chown(rootfs, *root, follow_symlinks=False)
    return True


def is_host_root_whiteout(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0 and info.st_uid == 0


def give_whiteouts(upper: str, root: tuple[int, int]) -> int:
    """Chown the whiteouts the host's root made in `upper` to the namespace's root; returns how many."""
    changed = 0
    for directory, subdirectories, files in os.walk(upper):  # never follows symlinks
        for name in (*subdirectories, *files):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if is_host_root_whiteout(info):
                os.chown(path, root[0], root[1] if info.st_gid == 0 else info.st_gid, follow_symlinks=False)
                changed += 1
    return changed


def option_value(arguments: list[str], name: str) -> str | None:
    for index, argument in enumerate(arguments):
        if argument == name and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith(name + "="):
            return argument.split("=", 1)[1]
    return None


def load_config(bundle: str) -> dict[str, object]:
    return dict(json.loads((Path(bundle) / "config.json").read_text()))


def before_create(arguments: list[str]) -> None:
    bundle = option_value(arguments, "--bundle") or option_value(arguments, "-b") or os.getcwd()
    config = load_config(bundle)
    owner = namespace_root(config)
    root = config.get("root")
    if owner is None or not isinstance(root, dict):
        return
    rootfs = str(Path(bundle) / str(root["path"]))  # an absolute path stays as it is
    if overlay_upper_dir(rootfs) is not None:
        give_root_directory(rootfs, owner)


def before_delete(runtime: str, global_arguments: list[str], container_id: str) -> None:
    state = subprocess.run(
        [runtime, *global_arguments, "state", container_id], capture_output=True, text=True, check=False
    )
    if state.returncode != 0:
        return  # already gone: nothing to repair
    facts = json.loads(state.stdout)
    owner = namespace_root(load_config(facts["bundle"]))
    upper = overlay_upper_dir(facts["rootfs"]) if owner is not None else None
    if owner is not None and upper is not None:
        give_whiteouts(upper, owner)


def main(arguments: list[str]) -> None:
    runtime = os.environ.get(REAL_RUNTIME_ENV) or "runc"
    command_index = next((i for i, a in enumerate(arguments) if a in ("create", "run", "delete")), None)
    if command_index is not None:
        command = arguments[command_index]
        try:
            if command in ("create", "run"):
                before_create(arguments[command_index + 1 :])
            elif arguments[command_index + 1 :]:
                before_delete(runtime, arguments[:command_index], arguments[-1])
        except (OSError, ValueError, KeyError) as error:
            # runc itself reports what is really wrong (a missing bundle, a bad state); a repair that could
            # not be made shows as the build step's own error.
            print(f"tidepool build runtime: {command}: {error}", file=sys.stderr)
    os.execvp(runtime, [runtime, *arguments])


if __name__ == "__main__":
    main(sys.argv[1:])
