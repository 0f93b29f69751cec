"""Run as the sandbox's user. The daemon starts as root so that an image without that user (any public image
used as a snapshot) still works: the user is created first, then privileges are dropped for good."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import subprocess

logger = logging.getLogger(__name__)
FIRST_REGULAR_UID = 1000


def become_user(name: str) -> None:
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
        with open("/etc/group", "a") as groups:
            groups.write(f"{name}:x:{gid}:\n")
        with open("/etc/passwd", "a") as users:
            users.write(f"{name}:x:{uid}:{gid}::{home}:{shell}\n")
        os.makedirs(home, exist_ok=True)
        os.chown(home, uid, gid)
    logger.info("created sandbox user %s", name)
    return pwd.getpwnam(name)


def _free_id(taken: set[int]) -> int:
    candidate = FIRST_REGULAR_UID
    while candidate in taken:
        candidate += 1
    return candidate
