"""Account files for images without them (a `FROM scratch` image has no /etc, /etc/passwd or /etc/group).

The daemon creates the sandbox's user as the sandbox's root, so these must be root's inside the sandbox.
Left alone, the engine makes them itself when the container starts (podman adds an entry for the
container's user, and the mount points of /etc/hosts and friends need /etc), as the HOST's root: in the
sandbox's user namespace that is `nobody`, and the file mode is 0600, so the sandbox's root can neither
read, append to, replace nor chown them. So before the first start the runner puts an empty /etc
(0755) and empty /etc/passwd and /etc/group (0644) owned by the sandbox's root into the container's
writable layer, wherever the image has none; the engine then appends to those.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

ETC = "etc"
ACCOUNT_FILES = ("etc/passwd", "etc/group")


def _in_image(relative: str, upper: Path, lower_dirs: Sequence[str]) -> bool:
    return os.path.lexists(upper / relative) or any(
        os.path.lexists(Path(lower) / relative) for lower in lower_dirs
    )


def add_missing_account_files(
    upper: Path, lower_dirs: Sequence[str], root_uid: int, root_gid: int
) -> list[str]:
    """Create in the writable layer `upper` what of /etc, /etc/passwd, /etc/group neither it nor the image
    (`lower_dirs`) has, owned by the sandbox's root (`root_uid`/`root_gid`: its host ids, as the layer
    stores them). Returns the paths created (relative, e.g. `etc/group`). OSError if the layer is not
    writable. Nothing is done where the image has the file, nor to an /etc of the image (a directory made
    in the upper layer would hide its owner and mode)."""
    created: list[str] = []
    if not upper.is_dir() or not lower_dirs:
        # No writable layer of the runner's own (attach makes it), or the engine did not say where the
        # image's layers are: an empty file made here would hide the image's own, so nothing is done.
        return created
    if not _in_image(ETC, upper, lower_dirs):
        (upper / ETC).mkdir(mode=0o755)
        os.chown(upper / ETC, root_uid, root_gid)
        os.chmod(upper / ETC, 0o755)
        created.append(ETC)
    if not os.path.isdir(upper / ETC):
        return created  # the image's own /etc: the daemon copes with what the engine adds there
    for relative in ACCOUNT_FILES:
        if _in_image(relative, upper, lower_dirs):
            continue
        path = upper / relative
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.fchown(fd, root_uid, root_gid)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        created.append(relative)
    return created
