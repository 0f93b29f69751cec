"""A toolbox socket served as a sandbox's daemon serves it: from a folder owned by the sandbox's root (an
unprivileged host uid), by a process running as that uid. Tests run as root, so the uid is taken only
around the server's `listen` (`SO_PEERCRED` reports the credentials of the last `listen` call)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

# A host uid as Podman's `--userns=auto` hands out to a sandbox's root.
SANDBOX_ROOT_UID = 268_500_000


def bound_socket(socket_dir: Path, uid: int, name: str = "toolbox.sock") -> socket.socket:
    """An unlistened unix socket at `socket_dir/name`; `socket_dir` is created 0700 and both belong to uid."""
    socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(socket_dir, uid, uid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(socket_dir / name))
    os.chown(socket_dir / name, uid, uid)
    return sock


@contextlib.contextmanager
def effective_uid(uid: int) -> Iterator[None]:
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


async def serve_as(uid: int, runner: web.AppRunner, socket_dir: Path, name: str = "toolbox.sock") -> None:
    """Serve `runner` on `socket_dir/name` as the process of `uid` would."""
    site = web.SockSite(runner, bound_socket(socket_dir, uid, name))
    with effective_uid(uid):
        await site.start()  # listen() happens here
