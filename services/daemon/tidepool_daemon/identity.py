"""Run as the sandbox's user. The daemon starts as root so that an image without that user (any public image
used as a snapshot) still works: the user is created first, then privileges are dropped for good."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile

logger = logging.getLogger(__name__)
FIRST_REGULAR_UID = 1000


def become_user(name: str) -> None:
    if os.geteuid() == 0:
        ensure_tmp_dir()
    if os.geteuid() != 0 or name in ("", "root"):
        return
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = _create_user(name)
    home = entry.pw_dir
    os.makedirs(home, exist_ok=True)
    if os.stat(home).st_uid == 0:
        # The engine creates a missing working directory as root; hand it to its user.
        os.chown(home, entry.pw_uid, entry.pw_gid)
    os.setgroups(os.getgrouplist(name, entry.pw_gid))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ.update(HOME=home, USER=name, LOGNAME=name)
    os.chdir(home)


def ensure_tmp_dir(path: str = "/tmp") -> None:
    """Make `path` (mode 1777, as every image's /tmp) when the image has none (scratch images). Why here and
    not elsewhere: the daemon's session folders and the user's programs go to the temporary folder, and
    without one Python's tempfile falls back to the current folder, the user's home, where they would
    show in the user's files; the runtime's own folder is mounted read-only, and only root can make /tmp."""
    if os.path.lexists(path):
        return
    try:
        os.mkdir(path)
        os.chmod(path, 0o1777)  # mkdir's mode is cut by the umask
    except OSError as error:
        logger.warning("the image has no %s and it cannot be made (%s)", path, error)


def enter_image_work_dir(image_work_dir: str) -> None:
    """Work from the image's `WORKDIR` when it has one (behaviour spec: "default cwd is the image WORKDIR,
    else the user's home"). The engine starts the daemon there (`/` when the image sets none), so the
    caller reads it with os.getcwd() before become_user() moves to the home folder. A WORKDIR the user
    cannot enter leaves the home folder."""
    if image_work_dir in ("", "/") or not os.path.isdir(image_work_dir):
        return
    try:
        os.chdir(image_work_dir)
    except OSError as error:
        logger.warning("image WORKDIR %s not usable (%s); staying in the home folder", image_work_dir, error)


def _create_user(name: str) -> pwd.struct_passwd:
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    home = f"/home/{name}"
    useradd = shutil.which("useradd") or shutil.which("adduser")
    if useradd and os.path.basename(useradd) == "useradd":
        subprocess.run([useradd, "--create-home", "--shell", shell, name], check=True, capture_output=True)
    else:
        # Minimal images (busybox, distroless-like) may lack useradd: write the account files directly.
        uid = _free_id({entry.pw_uid for entry in pwd.getpwall()})
        gid = (
            uid
            if uid not in {group.gr_gid for group in grp.getgrall()}
            else _free_id({group.gr_gid for group in grp.getgrall()})
        )
        append_account_line("/etc/group", f"{name}:x:{gid}:\n")
        append_account_line("/etc/passwd", f"{name}:x:{uid}:{gid}::{home}:{shell}\n")
        os.makedirs(home, exist_ok=True)
        os.chown(home, uid, gid)
    logger.info("created sandbox user %s", name)
    return pwd.getpwnam(name)


class AccountFileError(OSError):
    """The sandbox user cannot be written to /etc/passwd or /etc/group; str() is a one-line reason."""


def append_account_line(path: str, line: str) -> None:
    """Add `line` to the account file at `path` (/etc/passwd, /etc/group), leaving it owned by this (the
    sandbox's) root with mode 0644. Raises AccountFileError with a one-line reason when it cannot.

    Why not a plain append: an image without the file can end up with one that the engine made as the
    host's root (the sandbox's `nobody`, mode 0600), which the sandbox's root can neither read nor append
    to nor chown. So a file that is not root's 0644 one is replaced: the new content is written next to it
    and renamed over it (needs only /etc to be writable), keeping whatever lines could be read."""
    folder = os.path.dirname(path)
    try:
        info: os.stat_result | None = os.stat(path)
    except OSError:
        info = None  # absent (or /etc is no folder: the error comes with the write below)
    if info is not None and info.st_uid == 0 and stat.S_IMODE(info.st_mode) & 0o200:
        with open(path, "a") as handle:
            handle.write(line)
        if stat.S_IMODE(info.st_mode) & 0o044 != 0o044:
            os.chmod(path, stat.S_IMODE(info.st_mode) | 0o044)  # the user's own tools must read it
        return
    try:
        with open(path) as handle:
            existing = handle.read()
    except OSError:
        existing = ""  # absent, or not readable by the sandbox's root: nothing of it can be kept
    if existing and not existing.endswith("\n"):
        existing += "\n"
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".tidepool-", dir=folder)
    except OSError as error:
        raise AccountFileError(f"cannot write {path}: {folder} is not writable ({error.strerror})") from error
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(existing + line)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise AccountFileError(f"cannot replace {path} ({error.strerror})") from error


def _free_id(taken: set[int]) -> int:
    candidate = FIRST_REGULAR_UID
    while candidate in taken:
        candidate += 1
    return candidate
