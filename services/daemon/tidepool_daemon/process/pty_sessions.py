"""PTY sessions (`/process/pty…`): an interactive shell on a pseudo-terminal, driven over WebSockets.

* `GET /process/pty/create-connect?id=&cols=&rows=[&cwd=]` (WebSocket) creates and attaches in one step;
  subprotocols `X-Daytona-Pty-Exit-Control` (selected when offered) and
  `X-Daytona-Pty-Envs~<base64url-nopad(JSON)>` (extra env vars, never echoed back). A duplicate id is
  409 and bad parameters 400, both before the upgrade.
* `GET /process/pty/{id}/connect` (WebSocket) attaches to a running PTY; several clients may be
  attached at once and all see the output.
* After the upgrade the client gets `{"type":"control","status":"connected"}`, then any output the PTY
  produced while no client was attached (bounded), then live output as binary frames. Input (binary or
  text frames) goes to the PTY master as raw bytes (Ctrl-C is the byte 0x03).
* When the shell exits, clients that offered the exit-control subprotocol get
  `{"type":"control","status":"exited","exitCode":N,"termination":{…}}`; every client then gets a close
  frame, 1000 for exit 0 and 1011 otherwise, reason `{"exitCode":N}`, and the session is removed.
* A client disconnect never kills the PTY. `DELETE /process/pty/{id}` does: it ends every process the PTY
  started (its whole process tree, see `proctree.py`; the shell is a child subreaper).
* `POST /process/pty` creates without attaching (`lazyStart` defers the shell to the first connect),
  `GET /process/pty[/{id}]` describe sessions, `POST /process/pty/{id}/resize` sets the window size
  (TIOCSWINSZ on the master, which sends SIGWINCH to the foreground job).

The shell runs as the daemon's user, in its own session (setsid) with the PTY as controlling terminal:
subprocess starts a tiny helper on the daemon's own interpreter that issues TIOCSCTTY on its stdin and
execs the shell, which keeps fork-in-a-threaded-process hazards out of the daemon.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import select
import signal
import struct
import subprocess
import termios
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from ..context import DaemonContext
from ..environment import effective_environment
from ..errors import DaemonError, bad_request
from ..httpd.http_io import Request, Response, json_response
from ..httpd.websocket import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    Close,
    ConnectionClosed,
    WebSocket,
    offered_subprotocols,
    websocket_upgrade,
)
from .execute import COMMAND_SHELL
from .own_python import missing_shell, own_python_helper, require_shell
from .proctree import BECOME_SUBREAPER, TreeSpec, expose_to_oom_killer, kill_tree
from .termination import OomWatch, Termination, classify

logger = logging.getLogger("tidepool_daemon.pty")

EXIT_CONTROL_SUBPROTOCOL = "X-Daytona-Pty-Exit-Control"
ENVS_SUBPROTOCOL_PREFIX = "X-Daytona-Pty-Envs~"
PROCESS_NOT_FOUND = "PROCESS_NOT_FOUND"
DEFAULT_COLS, DEFAULT_ROWS = 80, 24
MAX_DIMENSION = 1000
MAX_ID_LENGTH = 256
# Output produced while no client is attached, replayed to the next one (oldest bytes dropped first).
BACKLOG_BYTES = 1024 * 1024
READ_SIZE = 64 * 1024
# The reader checks whether the shell exited while background jobs keep the terminal open this often.
EXIT_CHECK_SECONDS = 0.2
# After exit, output still arriving is forwarded until the terminal is quiet this long.
EXIT_DRAIN_SECONDS = 0.1
# A client that never answers our close frame is dropped after this long.
CLOSE_WAIT_SECONDS = 2.0
KILL_WAIT_SECONDS = 5.0
CONNECTED_GREETING = json.dumps({"type": "control", "status": "connected"}, separators=(",", ":"))

_CTTY_HELPER = BECOME_SUBREAPER + (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _not_found(session_id: str) -> DaemonError:
    return DaemonError(404, f"PTY session {session_id} not found", PROCESS_NOT_FOUND)


def _set_window_size(descriptor: int, cols: int, rows: int) -> None:
    fcntl.ioctl(descriptor, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class _Client:
    def __init__(self, ws: WebSocket, exit_control: bool) -> None:
        self.ws = ws
        self.exit_control = exit_control


class PtySession:
    def __init__(
        self,
        session_id: str,
        cwd: str,
        envs: dict[str, str],
        cols: int,
        rows: int,
        lazy_start: bool,
        env: dict[str, str],
        on_exit: Any,
    ) -> None:
        self.id = session_id
        self.cwd = cwd
        self.envs = envs
        self.cols = cols
        self.rows = rows
        self.lazy_start = lazy_start
        self.created_at = datetime.now(UTC)
        self._tree = TreeSpec()
        self._env = self._tree.environment(dict(env))
        self._on_exit = on_exit
        self._lock = threading.RLock()
        self._clients: list[_Client] = []
        self._backlog = bytearray()
        self._process: subprocess.Popen[bytes] | None = None
        self._master: int | None = None
        self._reader: threading.Thread | None = None
        self._oom: OomWatch | None = None
        self.exited = threading.Event()
        self.exit_code: int | None = None
        self.termination: Termination | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def active(self) -> bool:
        return self._process is not None and not self.exited.is_set()

    def start(self) -> None:
        with self._lock:
            if self._process is not None or self.exited.is_set():
                return
            require_shell(COMMAND_SHELL, "a PTY session")
            master, slave = os.openpty()
            try:
                _set_window_size(master, self.cols, self.rows)
                os.set_inheritable(slave, False)
                self._oom = OomWatch()
                self._process = subprocess.Popen(
                    own_python_helper(_CTTY_HELPER, COMMAND_SHELL),
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=self.cwd,
                    env=self._env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                os.close(master)
                raise DaemonError(500, f"failed to start the PTY shell: {exc}") from None
            finally:
                os.close(slave)
            expose_to_oom_killer(self._process.pid)
            os.set_blocking(master, False)
            self._master = master
            self._reader = threading.Thread(target=self._read_loop, name=f"pty-{self.id}", daemon=True)
            self._reader.start()

    def kill(self) -> None:
        with self._lock:
            process = self._process
            if process is None:
                # Never started (lazy): nothing runs, just end it.
                self._finish(Termination("signal", signal.SIGKILL), 128 + signal.SIGKILL)
                return
        # The shell leads its own session; job control puts background jobs in process groups of their
        # own, and `setsid`/`nohup` ones may leave both: end the whole tree (see proctree.py).
        kill_tree(TreeSpec(marker=self._tree.marker, sessions={process.pid}))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # in case /proc could not be read
        self.exited.wait(KILL_WAIT_SECONDS)

    def info(self) -> dict[str, Any]:
        with self._lock:
            info: dict[str, Any] = {
                "id": self.id,
                "cwd": self.cwd,
                "envs": dict(self.envs),
                "cols": self.cols,
                "rows": self.rows,
                "createdAt": self.created_at.isoformat().replace("+00:00", "Z"),
                "active": self.active,
                "lazyStart": self.lazy_start,
            }
            if self._process is not None:
                info["processId"] = self._process.pid
        return info

    def resize(self, cols: int, rows: int) -> None:
        with self._lock:
            self.cols, self.rows = cols, rows
            if self._master is not None:
                _set_window_size(self._master, cols, rows)

    # -- clients ----------------------------------------------------------------------------------

    def serve(self, ws: WebSocket) -> None:
        """A client's whole connection: attach, forward input until it leaves or the PTY exits.

        The `connected` control message already went out with the 101 (CONNECTED_GREETING)."""
        client = _Client(ws, ws.subprotocol == EXIT_CONTROL_SUBPROTOCOL)
        if not self._attach(client):
            return
        close_deadline: float | None = None
        try:
            while True:
                try:
                    event = ws.receive(timeout=1.0)
                except TimeoutError:
                    if ws.close_sent:
                        close_deadline = close_deadline or time.monotonic() + CLOSE_WAIT_SECONDS
                        if time.monotonic() >= close_deadline:
                            return
                    continue
                if isinstance(event, Close):
                    return
                if not ws.close_sent:
                    self.write_input(event.as_bytes())
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)

    def _attach(self, client: _Client) -> bool:
        if self.lazy_start and not self.started:
            self.start()
        with self._lock:
            if self.exited.is_set():
                self._send_exit(client)
                return False
            try:
                if self._backlog:
                    client.ws.send_bytes(bytes(self._backlog))
            except ConnectionClosed:
                return False
            self._backlog.clear()
            self._clients.append(client)
        return True

    def write_input(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self._lock:
                master = self._master
            if master is None:
                return
            try:
                written = os.write(master, view)
                view = view[written:]
            except BlockingIOError:
                poller = select.poll()
                poller.register(master, select.POLLOUT)
                poller.poll(1000)
            except OSError:
                return  # the terminal is gone; the reader reports the exit

    # -- reader thread ----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        assert self._process is not None and self._master is not None
        process, master = self._process, self._master
        exited_at: float | None = None
        poller = select.poll()
        poller.register(master, select.POLLIN)
        try:
            while True:
                if exited_at is None and process.poll() is not None:
                    exited_at = time.monotonic()
                wait = EXIT_CHECK_SECONDS if exited_at is None else EXIT_DRAIN_SECONDS
                if not poller.poll(wait * 1000):
                    if exited_at is not None:
                        break  # shell gone and the terminal went quiet (background jobs may hold it)
                    continue
                try:
                    chunk = os.read(master, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: every slave fd is closed
                        logger.warning("PTY %s read failed: %s", self.id, exc)
                    break
                if not chunk:
                    break
                self._broadcast(chunk)
        finally:
            returncode = process.wait()
            exit_code, termination = classify(returncode, oom=self._oom, kind="pty", command=self.id)
            self._finish(termination, exit_code)

    def _broadcast(self, chunk: bytes) -> None:
        with self._lock:
            if not self._clients:
                self._backlog += chunk
                if len(self._backlog) > BACKLOG_BYTES:
                    del self._backlog[: len(self._backlog) - BACKLOG_BYTES]
                return
            for client in list(self._clients):
                try:
                    client.ws.send_bytes(chunk)
                except ConnectionClosed:
                    self._clients.remove(client)

    def _finish(self, termination: Termination, exit_code: int) -> None:
        with self._lock:
            if self.exited.is_set():
                return
            self.exit_code, self.termination = exit_code, termination
            self.exited.set()
            clients, self._clients = self._clients, []
            if self._master is not None:
                with contextlib.suppress(OSError):
                    os.close(self._master)
                self._master = None
        for client in clients:
            self._send_exit(client)
        self._on_exit(self)

    def _send_exit(self, client: _Client) -> None:
        exit_code = self.exit_code if self.exit_code is not None else 0
        with contextlib.suppress(ConnectionClosed):
            if client.exit_control:
                control: dict[str, Any] = {"type": "control", "status": "exited", "exitCode": exit_code}
                if self.termination is not None:
                    control["termination"] = self.termination.as_dict()
                client.ws.send_text(json.dumps(control))
            # The client's own connection thread receives the close answer and ends the connection.
            client.ws.send_close(
                CLOSE_NORMAL if exit_code == 0 else CLOSE_INTERNAL_ERROR, json.dumps({"exitCode": exit_code})
            )


class PtyService:
    """The `/process/pty…` routes."""

    def __init__(self, context: DaemonContext) -> None:
        self._context = context
        self._sessions: dict[str, PtySession] = {}
        self._lock = threading.Lock()

    def _get(self, session_id: str) -> PtySession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise _not_found(session_id)
        return session

    def _forget(self, session: PtySession) -> None:
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    def _create(
        self,
        session_id: object,
        cwd: object,
        envs: dict[str, str],
        cols: int,
        rows: int,
        lazy_start: bool,
    ) -> PtySession:
        if session_id is None or session_id == "":
            session_id = str(uuid.uuid4())
        if not isinstance(session_id, str) or len(session_id) > MAX_ID_LENGTH or "/" in session_id:
            raise bad_request("id must be a string of at most 256 characters without '/'")
        resolved_cwd = self._context.resolve_cwd(cwd)
        require_shell(COMMAND_SHELL, "a PTY session")  # here too: a lazy start's error never reaches the SDK
        env = effective_environment(self._context)
        env.setdefault("TERM", "xterm-256color")
        env.update(envs)
        with self._lock:
            if session_id in self._sessions:
                raise DaemonError(409, f"PTY session {session_id} already exists", "CONFLICT")
            session = PtySession(session_id, resolved_cwd, envs, cols, rows, lazy_start, env, self._forget)
            self._sessions[session_id] = session
        if not lazy_start:
            try:
                session.start()
            except DaemonError:
                self._forget(session)
                raise
        return session

    # GET /process/pty/create-connect
    def create_connect(self, request: Request) -> Response:
        session_id = request.query_value("id")
        if not session_id:
            raise bad_request("query parameter 'id' is required")
        cols = _parse_dimension(request.query_value("cols"), "cols", DEFAULT_COLS)
        rows = _parse_dimension(request.query_value("rows"), "rows", DEFAULT_ROWS)
        envs = _envs_from_subprotocols(offered_subprotocols(request))
        protocol = _exit_control_protocol(request)
        # Validate the handshake before creating anything, so a bad upgrade leaves no session behind.
        websocket_upgrade(request, _noop, protocol=protocol)
        no_shell = missing_shell(COMMAND_SHELL, "a PTY session")
        if no_shell is not None:
            # The SDK shows nothing of a refused upgrade but its status: say it as its "error" control.
            return websocket_upgrade(request, functools.partial(_refuse, no_shell), protocol=protocol)
        session = self._create(session_id, request.query_value("cwd"), envs, cols, rows, lazy_start=False)
        return websocket_upgrade(request, session.serve, protocol=protocol, greeting=CONNECTED_GREETING)

    # GET /process/pty/{sessionId}/connect
    def connect(self, request: Request) -> Response:
        session = self._get(request.path_params["sessionId"])
        return websocket_upgrade(
            request, session.serve, protocol=_exit_control_protocol(request), greeting=CONNECTED_GREETING
        )

    # POST /process/pty
    def create(self, request: Request) -> Response:
        payload = request.json_object_body()
        raw_envs = payload.get("envs")
        envs = _validate_envs(raw_envs if raw_envs is not None else {})
        cols = _dimension_value(payload.get("cols"), "cols", DEFAULT_COLS)
        rows = _dimension_value(payload.get("rows"), "rows", DEFAULT_ROWS)
        lazy_start = payload.get("lazyStart", False)
        if not isinstance(lazy_start, bool):
            raise bad_request("lazyStart must be a boolean")
        session = self._create(payload.get("id"), payload.get("cwd"), envs, cols, rows, lazy_start)
        return json_response(201, {"sessionId": session.id})

    # GET /process/pty
    def list_sessions(self, request: Request) -> Response:
        with self._lock:
            sessions = list(self._sessions.values())
        return json_response(200, {"sessions": [session.info() for session in sessions]})

    # GET /process/pty/{sessionId}
    def get_session(self, request: Request) -> Response:
        return json_response(200, self._get(request.path_params["sessionId"]).info())

    # POST /process/pty/{sessionId}/resize
    def resize(self, request: Request) -> Response:
        session = self._get(request.path_params["sessionId"])
        payload = request.json_object_body()
        cols = _dimension_value(payload.get("cols"), "cols", None)
        rows = _dimension_value(payload.get("rows"), "rows", None)
        session.resize(cols, rows)
        return json_response(200, session.info())

    # DELETE /process/pty/{sessionId}
    def delete(self, request: Request) -> Response:
        session = self._get(request.path_params["sessionId"])
        session.kill()
        self._forget(session)
        return json_response(200, {})

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.kill()


def _noop(ws: WebSocket) -> None:
    return None


def _refuse(message: str, ws: WebSocket) -> None:
    ws.send_text(json.dumps({"type": "control", "status": "error", "error": message}))
    ws.close(1000)


def _exit_control_protocol(request: Request) -> str | None:
    return EXIT_CONTROL_SUBPROTOCOL if EXIT_CONTROL_SUBPROTOCOL in offered_subprotocols(request) else None


def _parse_dimension(raw: str | None, name: str, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer between 1 and {MAX_DIMENSION}") from None
    return _dimension_value(value, name, default)


def _dimension_value(value: object, name: str, default: int | None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSION:
        raise bad_request(f"{name} must be an integer between 1 and {MAX_DIMENSION}")
    return value


def _validate_envs(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise bad_request("envs must be an object of string values")
    envs: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name or "=" in name or "\x00" in name:
            raise bad_request(f"invalid environment variable name: {name!r}")
        if not isinstance(value, str) or "\x00" in value:
            raise bad_request(f"envs.{name} must be a string")
        envs[name] = value
    return envs


def _envs_from_subprotocols(offered: list[str]) -> dict[str, str]:
    envs: dict[str, str] = {}
    for token in offered:
        if not token.startswith(ENVS_SUBPROTOCOL_PREFIX):
            continue
        encoded = token[len(ENVS_SUBPROTOCOL_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            decoded = json.loads(raw.decode("utf-8"))
        except (binascii.Error, ValueError):
            raise bad_request("invalid X-Daytona-Pty-Envs subprotocol: expected base64url JSON") from None
        envs.update(_validate_envs(decoded))
    return envs
