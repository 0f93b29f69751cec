"""The daemon's two processes: a small supervisor that owns the toolbox socket, and a worker that serves it.

`python3 -I main.py --socket PATH [--user NAME] ...` starts the supervisor (the container's entrypoint, so
the child of the container's init). It

- binds and listens on the socket while it is still the sandbox's root: the socket file is the root's
  (mode 0600), and `SO_PEERCRED`, which reports the credentials of the `listen()` call, keeps naming the
  sandbox's root whichever worker happens to serve it (the runner checks exactly that);
- forks the worker (process name `tidepool-worker`), which keeps the listening socket, becomes the
  sandbox user and serves the toolbox API on it (see `worker.serve`);
- starts a fresh worker whenever the worker ends (a crash, a kill by the sandbox user), backing off when
  workers keep dying right after their start; connections wait in the socket's backlog meanwhile;
- on SIGUSR1 kills the worker (SIGKILL, which also ends a stopped or wedged one) so that a fresh one takes
  over. The runner sends it when the toolbox stops answering, through the engine
  (`POST /containers/{id}/kill?signal=SIGUSR1`): the engine signals the container's init, which forwards
  it to its child, this process. No process id crosses the sandbox boundary that way, and it works
  wherever the runner can reach the engine (it needs no view of the host's processes);
- on SIGTERM or SIGINT passes SIGTERM on to the worker, waits a little, removes the socket and exits.

The supervisor does no request work at all, so nothing a request does can wedge it. What a worker restart
keeps: every process the worker started (commands, session commands, background servers) is re-parented
to the container's init and keeps running. What it loses: the worker's in-memory state (the session list,
PTY sessions, whose shells get SIGHUP when their terminal's master side closes, interpreter contexts and
LSP servers). The image's entrypoint is started by the first worker only; it keeps running across
restarts, but later workers no longer list its session.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from types import FrameType

logger = logging.getLogger("tidepool_daemon.supervisor")

# Owner-only: the socket is bound while the daemon is still the sandbox's root, so only that uid and the
# host's root (the runner) may connect; the sandbox user's processes never reach the toolbox channel.
SOCKET_MODE = 0o600
LISTEN_BACKLOG = 256  # the SDK may open many connections at once
RESTART_SIGNAL = signal.SIGUSR1
# The worker's process name (/proc/PID/comm, at most 15 bytes), distinct from the supervisor's.
WORKER_PROCESS_NAME = "tidepool-worker"
_PR_SET_NAME = 15
# A worker that ends sooner than this after its start counts as a crash: the next start is delayed.
_HEALTHY_RUN_SECONDS = 5.0
# A worker that can never serve (e.g. the sandbox user cannot be created) exits with this code (EX_CONFIG),
# after a log line starting with FATAL_MARKER: the supervisor does not restart it, and the runner takes
# that line as the sandbox's error reason (tidepool_runner.container_backend keeps its own copy).
EXIT_CANNOT_START = 78
FATAL_MARKER = "daemon cannot start: "
_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 5.0
# How long a stopping worker may take to finish before it is killed.
_STOP_GRACE_SECONDS = 5.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tidepool-daemon", description="Tidepool in-sandbox toolbox daemon")
    parser.add_argument("--socket", help="unix socket path to listen on, e.g. /run/tidepool/toolbox.sock")
    parser.add_argument(
        "--tcp", type=_parse_tcp_address, metavar="HOST:PORT", help="TCP listener (debug only)"
    )
    parser.add_argument("--log-level", default=os.environ.get("TIDEPOOL_DAEMON_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--entrypoint-json",
        default="",
        help="JSON list: the image's entrypoint, run in the entrypoint session",
    )
    parser.add_argument("--user", default="", help="started as root: become this user (created if missing)")
    args = parser.parse_args(argv)
    if not args.socket and not args.tcp:
        parser.error("at least one of --socket or --tcp is required")
    return args


def _parse_tcp_address(raw: str) -> tuple[str, int]:
    host, separator, port = raw.rpartition(":")
    if not separator or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {raw!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    return Supervisor(args).run()


# ----- the environment the runner gives every worker -------------------------------------------------------

# Next to the toolbox socket (a folder only the sandbox's root may enter): a JSON object of variables every
# worker adds to its environment before it serves, e.g. the env of a sandbox claimed from a warm pool, whose
# container was created without it. Read at each worker start, so a restarted worker keeps them.
ENV_FILE_NAME = "env.json"


def apply_env_file(path: str) -> None:
    """Add the variables of the JSON object at `path` to this process's environment (a missing or malformed
    file adds nothing: the worker serves anyway, with the container's environment)."""
    try:
        with open(path, "rb") as handle:
            variables = json.loads(handle.read())
    except (OSError, ValueError):
        return
    if not isinstance(variables, dict):
        return
    for name, value in variables.items():
        valid_name = isinstance(name, str) and name and "=" not in name and "\x00" not in name
        if valid_name and isinstance(value, str) and "\x00" not in value:
            os.environ[name] = value


# ----- listeners ------------------------------------------------------------------------------------------


def bind_unix_listener(socket_path: str) -> socket.socket:
    """A listening unix socket at `socket_path` (mode 0600), replacing a stale socket file left there."""
    _remove_stale_socket(socket_path)
    os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(socket_path)
        os.chmod(socket_path, SOCKET_MODE)
        listener.listen(LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


def bind_tcp_listener(address: tuple[str, int]) -> socket.socket:
    listener = socket.create_server(address, backlog=LISTEN_BACKLOG)
    return listener


def _remove_stale_socket(socket_path: str) -> None:
    try:
        mode = os.lstat(socket_path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"refusing to replace non-socket file at {socket_path}")
    os.unlink(socket_path)


# ----- supervision ----------------------------------------------------------------------------------------


class Supervisor:
    """Owns the listeners and keeps exactly one worker serving them (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._listeners: list[tuple[str, socket.socket]] = []
        self._socket_inode: int | None = None
        self._worker: _Worker | None = None
        self._stopping = False
        self._restarts_requested = 0
        self.exit_code = 0

    def run(self) -> int:
        args = self._args
        if args.socket:
            listener = bind_unix_listener(args.socket)
            self._socket_inode = os.stat(args.socket).st_ino
            self._listeners.append(("unix", listener))
        if args.tcp:
            self._listeners.append(("tcp", bind_tcp_listener(args.tcp)))
        # PID 1 (no init in the container) ignores signals that have no handler, so always install them.
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(RESTART_SIGNAL, self._on_restart_signal)
        try:
            self._supervise()
        finally:
            self._close_listeners()
        return self.exit_code

    def _supervise(self) -> None:
        first = True
        quick_exits = 0
        while not self._stopping:
            started = time.monotonic()
            requested_before = self._restarts_requested
            try:
                self._worker = self._spawn(first)
            except OSError as error:
                # E.g. the sandbox's process limit is exhausted (a fork bomb): never give up the socket,
                # or the container would end with every user process; try again a little later.
                quick_exits += 1
                logger.error("cannot start a worker: %s", error)
                self._pause(min(_MAX_BACKOFF_SECONDS, _FIRST_BACKOFF_SECONDS * 2 ** (quick_exits - 1)))
                continue
            status = self._wait_for_worker(self._worker)
            if self._stopping:
                return
            if first and status == EXIT_CANNOT_START:
                # The first worker found the sandbox unusable for good (its log says why): restarting it
                # would only burn CPU, so the daemon ends and with it the container.
                logger.error("worker %d cannot start; the daemon stops", self._worker.pid)
                self.exit_code = EXIT_CANNOT_START
                return
            first = False
            lived = time.monotonic() - started
            requested = self._restarts_requested != requested_before
            quick_exits = 0 if requested or lived >= _HEALTHY_RUN_SECONDS else quick_exits + 1
            logger.warning(
                "worker %d %s after %.1f s%s; starting a new one",
                self._worker.pid,
                _describe_status(status),
                lived,
                " (restart requested)" if requested else "",
            )
            if quick_exits:
                self._pause(min(_MAX_BACKOFF_SECONDS, _FIRST_BACKOFF_SECONDS * 2 ** (quick_exits - 1)))

    def _spawn(self, first: bool) -> _Worker:
        """Fork the worker: no second interpreter start-up (about a third of the daemon's start), and the
        child imports the server itself, so the supervisor stays small. The supervisor is single-threaded,
        which makes the fork safe. Raises OSError when no process can be created (e.g. a fork bomb)."""
        pid = os.fork()
        if pid:
            logger.info("worker %d started", pid)
            return _Worker(pid)
        code = 70  # EX_SOFTWARE, if serve() raises
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, RESTART_SIGNAL, signal.SIGALRM):
                signal.signal(signum, signal.SIG_DFL)
            signal.alarm(0)
            _set_process_name(WORKER_PROCESS_NAME)
            worker_args = argparse.Namespace(**vars(self._args))
            # Only once: the entrypoint keeps running across worker restarts.
            worker_args.entrypoint_json = self._args.entrypoint_json if first else ""
            worker_args.listen_fd = [f"{kind}:{listener.fileno()}" for kind, listener in self._listeners]
            if self._args.socket:
                apply_env_file(os.path.join(os.path.dirname(self._args.socket), ENV_FILE_NAME))
            from .worker import serve

            code = serve(worker_args)
        except SystemExit as exit_request:
            code = exit_request.code if isinstance(exit_request.code, int) else 0
        except BaseException:
            logger.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def _wait_for_worker(self, worker: _Worker) -> int:
        # Signal handlers run in this (main) thread while it waits; the wait resumes afterwards (PEP 475).
        _pid, status = os.waitpid(worker.pid, 0)
        worker.returncode = os.waitstatus_to_exitcode(status)
        return worker.returncode

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(remaining, 0.1))

    def _on_restart_signal(self, signum: int, frame: FrameType | None) -> None:
        self._restarts_requested += 1
        worker = self._worker
        # Runs between the main thread's waits, so the worker has not been reaped yet: its pid is still
        # its own (a zombie keeps it) and cannot belong to another process.
        if worker is not None and worker.returncode is None:
            logger.warning("restart requested: killing worker %d", worker.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            return
        self._stopping = True
        worker = self._worker
        if worker is not None and worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
            signal.signal(signal.SIGALRM, self._on_stop_grace_expired)
            signal.alarm(int(_STOP_GRACE_SECONDS))

    def _on_stop_grace_expired(self, signum: int, frame: FrameType | None) -> None:
        worker = self._worker
        if worker is not None and worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def _close_listeners(self) -> None:
        for _kind, listener in self._listeners:
            listener.close()
        socket_path = self._args.socket
        # Only remove the socket we created, not one a newer daemon has put in its place.
        with contextlib.suppress(OSError):
            if socket_path and os.stat(socket_path).st_ino == self._socket_inode:
                os.unlink(socket_path)


class _Worker:
    """A forked worker: its pid, and its exit code once reaped (negative: the signal that ended it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


def _set_process_name(name: str) -> None:
    # The worker's command line is the supervisor's (a fork); its name (`comm`, as `ps` and
    # /proc/PID/comm show it) tells the two apart. Best effort: prctl is Linux-only.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"
