"""The worker process: forked by the supervisor (`supervisor.py`), it becomes the sandbox user and serves
the toolbox API (`routes.build_router`) on the listeners it inherited, with the HTTP server of `httpd/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import socketserver
import threading
from types import FrameType

from . import DAEMON_VERSION
from .context import DaemonContext
from .httpd.server import TcpToolboxServer, UnixToolboxServer
from .identity import become_user, enter_image_work_dir
from .routes import build_router
from .supervisor import EXIT_CANNOT_START, FATAL_MARKER

logger = logging.getLogger("tidepool_daemon")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # Raised in the main thread, which unwinds serve_forever() and closes the listeners.
    raise SystemExit(0)


def serve(args: argparse.Namespace) -> int:
    """The worker (see supervisor.py): serve the listeners inherited from the supervisor as the sandbox
    user until SIGTERM. `args.listen_fd` holds `unix:FD` / `tcp:FD` entries: the supervisor's listeners."""
    listeners: list[tuple[str, socket.socket]] = []
    for entry in args.listen_fd:
        kind, _, raw_fd = entry.partition(":")
        listeners.append((kind, socket.socket(fileno=int(raw_fd))))
    image_work_dir = os.getcwd()  # the engine starts the daemon in the image's WORKDIR
    try:
        become_user(args.user)
    except Exception as error:
        # Permanent (the image's account files): the traceback goes to the container's log, and one line
        # with the reason, which the runner shows as the sandbox's errorReason; the supervisor then stops.
        logger.exception("cannot become the sandbox user %s", args.user)
        logger.error(
            "%s%s", FATAL_MARKER, _one_line(f"cannot set up the sandbox user {args.user!r}: {error}")
        )
        return EXIT_CANNOT_START
    enter_image_work_dir(image_work_dir)
    entrypoint = json.loads(args.entrypoint_json) if args.entrypoint_json else []
    context = DaemonContext.from_current_process(entrypoint=[str(part) for part in entrypoint])
    router = build_router(context)
    servers: list[socketserver.BaseServer] = []
    for kind, listener in listeners:
        if kind == "unix":
            servers.append(UnixToolboxServer(args.socket or "", router, listener))
        else:
            servers.append(TcpToolboxServer(args.tcp or ("", 0), router, listener))
    # PID 1 ignores SIGTERM unless a handler is installed, so always install one.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)

    for extra_server in servers[1:]:
        threading.Thread(target=extra_server.serve_forever, name="tcp-listener", daemon=True).start()
    logger.info(
        "tidepool daemon %s worker %d serving %s (work dir %s)",
        DAEMON_VERSION,
        os.getpid(),
        ", ".join(_describe(server) for server in servers),
        context.work_dir,
    )
    try:
        servers[0].serve_forever()
    finally:
        for server in servers:
            server.server_close()
    return 0


def _describe(server: socketserver.BaseServer) -> str:
    address = server.server_address
    if isinstance(address, tuple):
        return f"tcp://{address[0]}:{address[1]}"
    return f"unix://{os.fsdecode(address) if isinstance(address, bytes) else address}"
