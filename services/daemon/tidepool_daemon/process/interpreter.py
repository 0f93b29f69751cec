"""The stateful Python code interpreter (`/process/interpreter/...`).

A context is one long-lived REPL worker process (`interpreter_worker.py`, run with the sandbox's python3)
whose globals persist between executions. `POST /process/interpreter/context` creates one, `GET` lists
the user-created ones, `DELETE .../{id}` stops and forgets one. Code without a `contextId` runs in the
shared default context, started on first use and never listed.

Execution is a WebSocket (`GET /process/interpreter/execute`): the client sends one text frame
`{"code", "contextId"?, "envs"?, "timeout"?}`; the server streams `{"type":"stdout"|"stderr","text"}` and
at most one `{"type":"error","name","value","traceback"}`, then closes with 1000. When the timeout (default
10 minutes, 0 = none) expires the execution is interrupted (SIGINT, so the context's state survives; a
worker that ignores it is killed and restarted empty) and the socket closes with 4008.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import select
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..context import DaemonContext
from ..errors import DaemonError, bad_request, utc_timestamp
from ..httpd.http_io import READ_CHUNK_SIZE, Request, Response, json_response
from ..httpd.websocket import Close, ConnectionClosed, WebSocket, websocket_upgrade
from .proctree import expose_to_oom_killer
from .spawn_env import build_environment, parse_envs

logger = logging.getLogger("tidepool_daemon.interpreter")

WORKER_SOURCE = Path(__file__).with_name("interpreter_worker.py").read_text(encoding="utf-8")
DEFAULT_CONTEXT_ID = "default"
DEFAULT_TIMEOUT_SECONDS = 600.0  # upstream's default when the client sends no timeout
# How long an interpreter may take to start (not counted in the user's timeout; a loaded machine is slow).
WORKER_START_TIMEOUT_SECONDS = 120.0
CLOSE_TIMEOUT = 4008
CLOSE_POLICY_VIOLATION = 1008
# How long the client may take to send its request frame after the upgrade.
REQUEST_FRAME_TIMEOUT_SECONDS = 30.0
# After SIGINT on timeout, how long the execution may take to unwind before the worker is killed.
INTERRUPT_GRACE_SECONDS = 2.0
# After the reply, how long to wait for the end markers on stdout/stderr (output of the execution).
MARKER_WAIT_SECONDS = 2.0
_POLL_INTERVAL_SECONDS = 0.1
SUPPORTED_LANGUAGES = ("python",)

EventSink = Callable[[dict[str, Any]], None]


class ExecutionTimeout(Exception):
    """The execution ran past its timeout and was interrupted."""


class _Worker:
    """One REPL worker process and its four pipes."""

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        request_read, self._request_fd = os.pipe()
        self._reply_fd, reply_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [_python_executable(), "-u", "-c", WORKER_SOURCE, str(request_read), str(reply_write)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                pass_fds=(request_read, reply_write),
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            for descriptor in (request_read, reply_write, self._request_fd, self._reply_fd):
                with contextlib.suppress(OSError):
                    os.close(descriptor)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(request_read)
            with contextlib.suppress(OSError):
                os.close(reply_write)
        assert self.process.stdout is not None and self.process.stderr is not None
        expose_to_oom_killer(self.process.pid)
        self.stdout_fd = self.process.stdout.fileno()
        self.stderr_fd = self.process.stderr.fileno()
        self.reply_fd = self._reply_fd
        self.ready = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        """Consume the worker's `{"ready": true}` frame (once); False if it died or took longer."""
        if self.ready:
            return True
        deadline = time.monotonic() + timeout
        frame = b""
        while True:
            length = struct.unpack("!I", frame[:4])[0] if len(frame) >= 4 else None
            if length is not None and len(frame) >= 4 + length:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self._reply_fd], [], [], remaining)
            if not ready:
                return False
            # Exactly up to the frame's end: what follows belongs to the first execution's reply.
            wanted = (4 - len(frame)) if length is None else (4 + length - len(frame))
            chunk = os.read(self._reply_fd, wanted)
            if not chunk:
                return False
            frame += chunk
        self.ready = True
        return True

    def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8", "surrogatepass")
        frame = struct.pack("!I", len(data)) + data
        view = memoryview(frame)
        while view:
            written = os.write(self._request_fd, view)
            view = view[written:]

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.process.pid, signal.SIGINT)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            self.process.kill()
        self.process.wait()
        self.close_pipes()

    def stop(self) -> None:
        """Ask the worker to exit (EOF on its request pipe), then make sure it is gone."""
        with contextlib.suppress(OSError):
            os.close(self._request_fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1.0)
        self.kill()

    def close_pipes(self) -> None:
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        for descriptor in (self._request_fd, self._reply_fd):
            with contextlib.suppress(OSError):
                os.close(descriptor)


def _python_executable() -> str:
    """The image's python3 (never the toolbox's own runtime); DaemonError 400 naming it when there is none."""
    import shutil

    python = shutil.which("python3")
    if python is None:
        raise DaemonError(
            400, "the code interpreter needs python3, but this sandbox's image has none on PATH"
        )
    return python


@dataclass
class InterpreterContext:
    id: str
    cwd: str
    language: str
    created_at: str
    env: dict[str, str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    worker: _Worker | None = None
    deleted: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cwd": self.cwd,
            "language": self.language,
            "createdAt": self.created_at,
            "active": not self.deleted and self.worker is not None and self.worker.alive(),
        }

    def discard_worker(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None

    def ensure_worker(self) -> _Worker:
        if self.worker is not None and not self.worker.alive():
            self.worker.kill()
            self.worker = None
        if self.worker is None:
            try:
                self.worker = _Worker(self.cwd, self.env)
            except OSError as exc:
                raise DaemonError(500, f"failed to start the interpreter: {exc}") from None
        return self.worker


class _OutputStream:
    """Decodes one output pipe and finds the execution's end marker, which may be split across reads."""

    def __init__(self, kind: str, marker: bytes) -> None:
        self.kind = kind
        self._marker = marker
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = b""
        self.done = False

    def feed(self, chunk: bytes) -> str:
        data = self._pending + chunk
        self._pending = b""
        index = data.find(self._marker)
        if index >= 0:
            self.done = True
            data = data[:index] + data[index + len(self._marker) :]
        else:
            # Hold back a tail that could be the start of the marker.
            for keep in range(min(len(self._marker) - 1, len(data)), 0, -1):
                if self._marker.startswith(data[-keep:]):
                    self._pending = data[-keep:]
                    data = data[:-keep]
                    break
        return self._decoder.decode(data)

    def finish(self) -> str:
        text = self._decoder.decode(self._pending, final=True)
        self._pending = b""
        return text


class InterpreterService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context
        self._contexts: dict[str, InterpreterContext] = {}
        self._lock = threading.Lock()

    # -- HTTP endpoints ---------------------------------------------------------------------------

    def create_context(self, request: Request) -> Response:
        payload = request.json_object_body(optional=True)
        cwd = self._context.resolve_cwd(payload.get("cwd"))
        language = _parse_language(payload.get("language"))
        interpreter_context = InterpreterContext(
            id=str(uuid.uuid4()),
            cwd=cwd,
            language=language,
            created_at=utc_timestamp(),
            env=build_environment(self._context),
        )
        interpreter_context.ensure_worker()
        with self._lock:
            self._contexts[interpreter_context.id] = interpreter_context
        return json_response(200, interpreter_context.describe())

    def list_contexts(self, request: Request) -> Response:
        with self._lock:
            contexts = [context for context in self._contexts.values() if context.id != DEFAULT_CONTEXT_ID]
        contexts.sort(key=lambda context: context.created_at)
        return json_response(200, {"contexts": [context.describe() for context in contexts]})

    def delete_context(self, request: Request) -> Response:
        context_id = request.path_params["id"]
        if context_id == DEFAULT_CONTEXT_ID:
            raise bad_request("the default context cannot be deleted")
        with self._lock:
            interpreter_context = self._contexts.pop(context_id, None)
        if interpreter_context is None:
            raise DaemonError(404, f"interpreter context not found: {context_id}")
        interpreter_context.deleted = True
        worker = interpreter_context.worker
        if worker is not None:
            # Stop it even if an execution is running there: that execution then ends with an error.
            if interpreter_context.lock.locked():
                worker.kill()
            else:
                worker.stop()
        return json_response(200, {})

    def execute(self, request: Request) -> Response:
        return websocket_upgrade(request, self._serve_execution)

    # -- execution --------------------------------------------------------------------------------

    def _serve_execution(self, ws: WebSocket) -> None:
        try:
            message = ws.receive(timeout=REQUEST_FRAME_TIMEOUT_SECONDS)
        except TimeoutError:
            ws.close(CLOSE_POLICY_VIOLATION, "no execution request received")
            return
        if isinstance(message, Close):
            return
        try:
            payload = json.loads(message.as_text())
            if not isinstance(payload, dict):
                raise ValueError("the request must be a JSON object")
            code = payload.get("code")
            if not isinstance(code, str):
                raise ValueError("code is required and must be a string")
            envs = parse_envs(payload.get("envs"))
            timeout = _parse_timeout(payload.get("timeout"))
            interpreter_context = self._context_for(payload.get("contextId"))
        except (ValueError, DaemonError) as exc:
            ws.close(CLOSE_POLICY_VIOLATION, str(getattr(exc, "message", exc)))
            return

        def send(event: dict[str, Any]) -> None:
            with contextlib.suppress(ConnectionClosed):
                ws.send_text(json.dumps(event, ensure_ascii=False))

        # Keep receiving while the code runs: that answers the client's keepalive pings (the SDK pings
        # every 20 s and gives up on a silent peer) and notices a client that went away.
        threading.Thread(target=_receive_until_closed, args=(ws,), name="interpreter-ws", daemon=True).start()
        try:
            self.run(interpreter_context, code, envs, timeout, send)
        except DaemonError as exc:  # e.g. no python3 in the image: the execution's error, not a crash
            send(_error_event("InterpreterUnavailable", exc.message))
        except ExecutionTimeout:
            ws.close(CLOSE_TIMEOUT, "execution timed out")
            return
        ws.close(1000)

    def _context_for(self, raw_id: object) -> InterpreterContext:
        if raw_id is None or raw_id == "" or raw_id == DEFAULT_CONTEXT_ID:
            with self._lock:
                default = self._contexts.get(DEFAULT_CONTEXT_ID)
                if default is None:
                    default = InterpreterContext(
                        id=DEFAULT_CONTEXT_ID,
                        cwd=self._context.work_dir,
                        language="python",
                        created_at=utc_timestamp(),
                        env=build_environment(self._context),
                    )
                    self._contexts[DEFAULT_CONTEXT_ID] = default
                return default
        if not isinstance(raw_id, str):
            raise ValueError("contextId must be a string")
        with self._lock:
            found = self._contexts.get(raw_id)
        if found is None:
            raise ValueError(f"interpreter context not found: {raw_id}")
        return found

    def run(
        self,
        interpreter_context: InterpreterContext,
        code: str,
        envs: dict[str, str],
        timeout: float | None,
        emit: EventSink,
    ) -> None:
        """Run `code` in the context, streaming events to `emit`; raises ExecutionTimeout on timeout."""
        # The timeout measures the user's code: waiting behind an earlier execution in the same context
        # counts (it is the user's own work), starting the interpreter does not.
        lock_wait = -1 if timeout is None else timeout
        if not interpreter_context.lock.acquire(timeout=lock_wait):
            raise ExecutionTimeout
        try:
            if interpreter_context.deleted:
                emit(_error_event("ContextDeleted", "the interpreter context was deleted"))
                return
            worker = interpreter_context.ensure_worker()
            if not worker.wait_ready(WORKER_START_TIMEOUT_SECONDS):
                interpreter_context.discard_worker()
                raise DaemonError(500, "the interpreter did not start")
            deadline = None if timeout is None else time.monotonic() + timeout
            _Execution(interpreter_context, worker, code, envs, deadline, emit).run()
        finally:
            interpreter_context.lock.release()


class _Execution:
    def __init__(
        self,
        interpreter_context: InterpreterContext,
        worker: _Worker,
        code: str,
        envs: dict[str, str],
        deadline: float | None,
        emit: EventSink,
    ) -> None:
        self._context = interpreter_context
        self._worker = worker
        self._code = code
        self._envs = envs
        self._deadline = deadline
        self._emit = emit
        marker = f"\x1e\x1ftidepool-end-{uuid.uuid4().hex}\x1f\x1e".encode("ascii")
        self._marker = marker
        self._streams = {
            worker.stdout_fd: _OutputStream("stdout", marker),
            worker.stderr_fd: _OutputStream("stderr", marker),
        }
        self._reply_buffer = b""
        self._reply: dict[str, Any] | None = None

    def run(self) -> None:
        try:
            self._worker.send(
                {"code": self._code, "envs": self._envs, "marker": self._marker.decode("ascii")}
            )
        except OSError:
            self._worker_died()
            return
        interrupted_at: float | None = None
        replied_at: float | None = None
        while True:
            now = time.monotonic()
            if self._reply is not None:
                replied_at = replied_at or now
                if (
                    all(stream.done for stream in self._streams.values())
                    or now - replied_at > MARKER_WAIT_SECONDS
                ):
                    break
            elif interrupted_at is None and self._deadline is not None and now >= self._deadline:
                self._worker.interrupt()
                interrupted_at = now
            elif interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE_SECONDS:
                self._kill_worker()
                self._flush_streams()
                raise ExecutionTimeout
            if not self._pump(_POLL_INTERVAL_SECONDS):
                self._flush_streams()
                if interrupted_at is not None:
                    self._kill_worker()
                    raise ExecutionTimeout
                self._worker_died()
                return
        self._flush_streams()
        if interrupted_at is not None:
            raise ExecutionTimeout
        error = self._reply.get("error") if self._reply else None
        if isinstance(error, dict):
            self._emit(
                _error_event(
                    str(error.get("name", "")), str(error.get("value", "")), str(error.get("traceback", ""))
                )
            )

    def _pump(self, wait_seconds: float) -> bool:
        """Move output and reply bytes; False once the worker is gone (reply pipe at EOF)."""
        descriptors = [fd for fd, stream in self._streams.items() if not stream.done]
        if self._reply is None:
            descriptors.append(self._worker.reply_fd)
        if not descriptors:
            return True
        try:
            ready, _, _ = select.select(descriptors, [], [], wait_seconds)
        except (OSError, ValueError):
            return False
        worker_gone = False
        for descriptor in ready:
            try:
                chunk = os.read(descriptor, READ_CHUNK_SIZE)
            except OSError:
                chunk = b""
            if descriptor == self._worker.reply_fd:
                if not chunk:
                    worker_gone = True
                    continue
                self._reply_buffer += chunk
                self._parse_reply()
                continue
            stream = self._streams[descriptor]
            if not chunk:
                stream.done = True  # EOF: the worker closed or lost this pipe
                continue
            text = stream.feed(chunk)
            if text:
                self._emit({"type": stream.kind, "text": text})
        return not worker_gone

    def _parse_reply(self) -> None:
        if len(self._reply_buffer) < 4:
            return
        (length,) = struct.unpack("!I", self._reply_buffer[:4])
        if len(self._reply_buffer) < 4 + length:
            return
        try:
            reply = json.loads(self._reply_buffer[4 : 4 + length].decode("utf-8"))
        except ValueError:
            reply = {"error": {"name": "InternalError", "value": "malformed reply from the interpreter"}}
        self._reply = reply if isinstance(reply, dict) else {}
        self._reply_buffer = self._reply_buffer[4 + length :]

    def _flush_streams(self) -> None:
        for stream in self._streams.values():
            text = stream.finish()
            if text:
                self._emit({"type": stream.kind, "text": text})

    def _kill_worker(self) -> None:
        self._worker.kill()
        if self._context.worker is self._worker:
            self._context.worker = None

    def _worker_died(self) -> None:
        # Collect whatever the worker wrote before it went away (EOF, or quiet for a moment when a
        # grandchild still holds the pipes).
        while not all(stream.done for stream in self._streams.values()):
            open_fds = [fd for fd, stream in self._streams.items() if not stream.done]
            ready, _, _ = select.select(open_fds, [], [], 0.2)
            if not ready:
                break
            for descriptor in ready:
                stream = self._streams[descriptor]
                try:
                    chunk = os.read(descriptor, READ_CHUNK_SIZE)
                except OSError:
                    chunk = b""
                if not chunk:
                    stream.done = True
                elif text := stream.feed(chunk):
                    self._emit({"type": stream.kind, "text": text})
        self._flush_streams()
        self._worker.process.wait()
        exit_code = self._worker.process.returncode
        self._kill_worker()
        if self._context.deleted:
            self._emit(_error_event("ContextDeleted", "the interpreter context was deleted"))
            return
        self._emit(
            _error_event(
                "InterpreterExited",
                f"the interpreter process exited (code {exit_code}); the context's state was reset",
            )
        )


def _receive_until_closed(ws: WebSocket) -> None:
    """Drain client frames (answering pings) until the connection closes; extra messages are ignored."""
    with contextlib.suppress(Exception):
        while not isinstance(ws.receive(), Close):
            pass


def _error_event(name: str, value: str, traceback: str = "") -> dict[str, Any]:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


def _parse_language(raw: object) -> str:
    if raw is None or raw == "":
        return "python"
    if not isinstance(raw, str) or raw.lower() not in SUPPORTED_LANGUAGES:
        raise bad_request(f"unsupported interpreter language {raw!r}; supported: python")
    return raw.lower()


def _parse_timeout(raw: object) -> float | None:
    if raw is None:
        return DEFAULT_TIMEOUT_SECONDS
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError("timeout must be a number of seconds")
    return float(raw) if raw > 0 else None
