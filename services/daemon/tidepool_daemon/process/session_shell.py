"""A process session: one persistent shell, commands run inside it, their logs. The `/process/session…`
routes on top of it are in `sessions.py`.

How a command runs
------------------
Each session is ONE long-lived shell (bash if present, else sh) in its own process group, reading commands
from a pipe. For every exec the daemon writes the command text to a script file and creates three FIFOs
(stdout, stderr, stdin), then sends the shell a single line::

    { . 'DIR/7.sh'; } <'DIR/7.in' >'DIR/7.out' 2>'DIR/7.err'; printf '%s %s\\n' 7 "$?"

A synchronous command's stdin is `/dev/null` (a command that reads it, e.g. `cat`, sees end-of-file at
once); an asynchronous command's stdin is its FIFO, which stays open until the command completes, so
`send_session_command_input` can feed it.

Sourcing (`.`) runs the command in the session shell itself, so `export`, `cd`, functions and aliases
persist across execs, while a syntax error stays confined to that command. The shell's own stdout carries
nothing but those `key status` lines, so the exit code arrives the moment the command finishes.

One pump thread per session polls every FIFO of the session (plus the status pipe) and appends the output
to the command's log file as `\\x01\\x01\\x01<stdout chunk>` / `\\x02\\x02\\x02<stderr chunk>`: the same
byte stream the log WebSocket sends, so a follower can resume at any byte `offset`. A command counts as
complete once its status is known and its pipes reached EOF or went quiet (background jobs that keep a
pipe open, e.g. `server &`, keep being logged but do not hold up the command; their pipes are never closed
under them, so they never get SIGPIPE).

If the shell dies (`exit` inside a command, `set -e`, a signal), the commands it was running or had
queued complete with its status, and the next exec starts a fresh shell (earlier state is lost).

Commands in one session run one after another (it is one shell); async execs queue behind a running one,
like upstream. Deleting a session ends its whole process tree (`proctree.py`: the shell is a child
subreaper, its commands carry the session's tree marker, and every session its shells led counts), including
processes that moved to their own session or process group or ignore SIGTERM, then removes its files.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..context import DaemonContext
from ..environment import effective_environment
from ..errors import DaemonError
from ..httpd.http_io import READ_CHUNK_SIZE
from ..httpd.websocket import CLOSE_NORMAL, Close, ConnectionClosed, WebSocket
from .execute import COMMAND_SHELL
from .own_python import own_python_helper, require_shell
from .proctree import SUBREAPER_EXEC_HELPER, TreeSpec, expose_to_oom_killer, kill_tree
from .termination import OomWatch, Termination, classify

logger = logging.getLogger("tidepool_daemon.sessions")

STDOUT_MARKER = b"\x01\x01\x01"
STDERR_MARKER = b"\x02\x02\x02"
PROCESS_NOT_FOUND = "PROCESS_NOT_FOUND"
SESSION_ENDED = "SESSION_ENDED"
COMMAND_ALREADY_COMPLETED = "COMMAND_ALREADY_COMPLETED"
# After a command's status arrives: keep collecting while output flows, stop once quiet this long...
DRAIN_IDLE_SECONDS = 0.1
# ...or after this long in any case (a background job chattering on the inherited pipe).
DRAIN_MAX_SECONDS = 2.0
# How long a deleted session's pump keeps reading what its killed processes left in the pipes.
CLOSE_DRAIN_SECONDS = 0.2
# A follower checks its WebSocket (pings, client close) at least this often while waiting for output.
FOLLOW_POLL_SECONDS = 0.25
INPUT_WRITE_TIMEOUT_SECONDS = 10.0
LOG_FRAME_BYTES = 64 * 1024
SHELL_EXIT_POLL_SECONDS = 0.2


def not_found(message: str) -> DaemonError:
    return DaemonError(404, message, PROCESS_NOT_FOUND)


@dataclass(eq=False)
class SessionCommand:
    key: int
    id: str
    command: str
    suppress_input_echo: bool
    interactive: bool
    log_path: str
    fifo_paths: tuple[str, ...]
    log_fd: int | None = None
    out_fd: int | None = None
    err_fd: int | None = None
    in_fd: int | None = None
    exit_code: int | None = None
    termination: Termination | None = None
    exited_at: float | None = None
    last_output_at: float = 0.0
    complete: bool = False
    log_size: int = 0
    oom: OomWatch = field(default_factory=OomWatch)

    def as_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"id": self.id, "command": self.command}
        # Only once its output is drained (complete): a client that sees the exit code and then reads the
        # logs must get all of them, as a synchronous command's answer has.
        if self.exit_code is not None and self.complete:
            payload["exitCode"] = self.exit_code
            if self.termination is not None:
                payload["termination"] = self.termination.as_dict()
        return payload


def split_log(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(combined output without markers, stdout, stderr) from a marked log."""
    output = bytearray()
    streams = {STDOUT_MARKER: bytearray(), STDERR_MARKER: bytearray()}
    current = streams[STDOUT_MARKER]
    position = 0
    while position < len(data):
        next_out = data.find(STDOUT_MARKER, position)
        next_err = data.find(STDERR_MARKER, position)
        candidates = [index for index in (next_out, next_err) if index != -1]
        end = min(candidates) if candidates else len(data)
        chunk = data[position:end]
        output += chunk
        current += chunk
        if end == len(data):
            break
        marker = STDOUT_MARKER if end == next_out else STDERR_MARKER
        current = streams[marker]
        position = end + len(marker)
    return bytes(output), bytes(streams[STDOUT_MARKER]), bytes(streams[STDERR_MARKER])


class Session:
    def __init__(self, session_id: str, context: DaemonContext) -> None:
        self.id = session_id
        self.created_at = datetime.now(UTC)
        self._context = context
        self._dir = tempfile.mkdtemp(prefix="tidepool-session-")
        self._cond = threading.Condition()
        self._stdin_lock = threading.Lock()
        self._commands: dict[str, SessionCommand] = {}
        self._pending: collections.deque[SessionCommand] = collections.deque()
        self._shell: subprocess.Popen[bytes] | None = None
        self._tree = TreeSpec()
        # Every shell this session started leads its own process group; background jobs of a shell that
        # already died still live in its group, so deletion kills them all.
        self._process_groups: list[int] = []
        self._status_fd: int | None = None
        # Readable once the shell exits. The status pipe's EOF is no substitute: subshells forked by
        # `( … ) &` inherit bash's saved copy of it and keep it open until they end.
        self._shell_pidfd: int | None = None
        self._status_buffer = bytearray()
        self._seq = 0
        self._closed = False
        self._closed_at: float | None = None
        self._wake_r: int | None
        self._wake_w: int | None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._pump_thread = threading.Thread(target=self._pump, name=f"session-{session_id}", daemon=True)
        self._pump_thread.start()

    # -- public API (HTTP threads) ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def as_dict(self) -> dict[str, Any]:
        with self._cond:
            commands = [command.as_dict() for command in self._commands.values()]
        return {"sessionId": self.id, "commands": commands}

    def command(self, command_id: str) -> SessionCommand:
        with self._cond:
            command = self._commands.get(command_id)
        if command is None:
            raise not_found(f"command {command_id} not found in session {self.id}")
        return command

    def submit(
        self, command_text: str, suppress_input_echo: bool, interactive: bool = True
    ) -> SessionCommand:
        """Queue a command. `interactive` (asynchronous commands): its stdin is a FIFO that
        `send_input` writes to; otherwise stdin is `/dev/null`."""
        with self._stdin_lock:
            with self._cond:
                if self._closed:
                    raise DaemonError(410, f"session {self.id} has ended", SESSION_ENDED)
                shell = self._ensure_shell()
                command = self._prepare_command(command_text, suppress_input_echo, interactive)
                self._commands[command.id] = command
                self._pending.append(command)
            line = self._wrapper_line(command)
            try:
                assert shell.stdin is not None
                shell.stdin.write(line)
                shell.stdin.flush()
            except OSError:
                # The shell is gone; the pump sees its status pipe close and completes the command.
                logger.info("session %s shell exited before command %s was sent", self.id, command.id)
        self._wake()
        return command

    def wait_complete(self, command: SessionCommand) -> None:
        with self._cond:
            while not command.complete:
                self._cond.wait()

    def read_log(self, command: SessionCommand, offset: int = 0, limit: int | None = None) -> bytes:
        try:
            with open(command.log_path, "rb") as log_file:
                log_file.seek(offset)
                return log_file.read() if limit is None else log_file.read(limit)
        except FileNotFoundError:
            return b""

    def send_input(self, command: SessionCommand, data: str) -> None:
        if not data.endswith("\n"):
            data += "\n"  # like upstream: line-oriented readers (`read`) need the newline
        payload = data.encode("utf-8", "surrogatepass")
        with self._cond:
            if command.complete or command.exit_code is not None or command.in_fd is None:
                raise DaemonError(
                    410,
                    f"command {command.id} has already completed with exit code {command.exit_code}",
                    COMMAND_ALREADY_COMPLETED,
                )
            in_fd = command.in_fd
            # Hold the lock while writing so the pump cannot close the fd under us; the write is
            # non-blocking and bounded by INPUT_WRITE_TIMEOUT_SECONDS.
            view = memoryview(payload)
            deadline = time.monotonic() + INPUT_WRITE_TIMEOUT_SECONDS
            while view:
                try:
                    written = os.write(in_fd, view)
                    view = view[written:]
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DaemonError(
                            503, "the command is not reading its input", "INPUT_BUFFER_FULL"
                        ) from None
                    self._cond.wait(min(remaining, 0.05))
                    if command.in_fd != in_fd:
                        raise DaemonError(
                            410, f"command {command.id} has completed", COMMAND_ALREADY_COMPLETED
                        ) from None
            if not command.suppress_input_echo:
                self._append_log(command, STDOUT_MARKER + payload)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._closed_at = time.monotonic()
            shell = self._shell
            process_groups = list(self._process_groups)
        # Every shell led its own session; the session ids stay reserved while any process is in them.
        kill_tree(TreeSpec(marker=self._tree.marker, sessions=set(process_groups)))
        for process_group in process_groups:  # in case /proc could not be read
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process_group, signal.SIGKILL)
        self._wake()
        self._pump_thread.join(timeout=5)
        if shell is not None:
            shell.wait()
            for stream in (shell.stdin, shell.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- command setup ----------------------------------------------------------------------------

    def _ensure_shell(self) -> subprocess.Popen[bytes]:
        if self._shell is not None:
            return self._shell
        require_shell(COMMAND_SHELL, "a session command")
        try:
            shell = subprocess.Popen(
                # A child subreaper: orphans of its commands stay in its tree (see proctree.py).
                own_python_helper(SUBREAPER_EXEC_HELPER, COMMAND_SHELL),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=self._context.work_dir,
                env=self._tree.environment(effective_environment(self._context)),
                start_new_session=True,  # own session: delete ends everything in it
                close_fds=True,
                bufsize=0,
            )
        except OSError as exc:
            raise DaemonError(500, f"failed to start the session shell: {exc}") from None
        assert shell.stdout is not None
        expose_to_oom_killer(shell.pid)
        self._shell = shell
        self._process_groups.append(shell.pid)
        self._status_fd = shell.stdout.fileno()
        os.set_blocking(self._status_fd, False)
        self._shell_pidfd = _pidfd_open(shell.pid)
        self._status_buffer.clear()
        return shell

    def _prepare_command(
        self, command_text: str, suppress_input_echo: bool, interactive: bool
    ) -> SessionCommand:
        self._seq += 1
        key = self._seq
        base = os.path.join(self._dir, str(key))
        script_path, out_path, err_path, in_path = (f"{base}.sh", f"{base}.out", f"{base}.err", f"{base}.in")
        with open(script_path, "w", encoding="utf-8", errors="surrogateescape") as script:
            script.write(command_text if command_text.endswith("\n") else command_text + "\n")
        fifo_paths = (out_path, err_path, in_path) if interactive else (out_path, err_path)
        for path in fifo_paths:
            os.mkfifo(path, 0o600)
        command = SessionCommand(
            key=key,
            id=str(uuid.uuid4()),
            command=command_text,
            suppress_input_echo=suppress_input_echo,
            interactive=interactive,
            log_path=f"{base}.log",
            fifo_paths=fifo_paths,
        )
        log_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        command.log_fd = os.open(command.log_path, log_flags, 0o600)
        # Read ends first, non-blocking, so the shell's opens for writing never wait on us. The stdin FIFO
        # is held open read-write: the command's `<` never blocks and its stdin stays open until it ends.
        command.out_fd = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        command.err_fd = os.open(err_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if interactive:
            command.in_fd = os.open(in_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        command.last_output_at = time.monotonic()
        return command

    def _wrapper_line(self, command: SessionCommand) -> bytes:
        script = os.path.join(self._dir, f"{command.key}.sh")
        out_path, err_path = command.fifo_paths[:2]
        quote = shlex.quote
        in_path = quote(command.fifo_paths[2]) if command.interactive else "/dev/null"
        line = (
            f"{{ . {quote(script)}; }} <{in_path} >{quote(out_path)} 2>{quote(err_path)}; "
            f"printf '%s %s\\n' {command.key} \"$?\"\n"
        )
        return line.encode("utf-8", "surrogateescape")

    # -- pump thread ------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            if self._wake_w is None:
                return
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"x")

    def _pump(self) -> None:
        try:
            while self._pump_once():
                pass
        except Exception:
            logger.exception("session %s pump failed", self.id)
        finally:
            self._shutdown_pump()

    def _pump_once(self) -> bool:
        """One poll round; False once the session is closed and everything is drained."""
        now = time.monotonic()
        watched: dict[int, tuple[SessionCommand | None, bytes | None]] = {}
        with self._cond:
            if self._closed and self._closed_at is not None:
                drained = self._status_fd is None and all(
                    command.out_fd is None and command.err_fd is None for command in self._commands.values()
                )
                if drained or now - self._closed_at >= CLOSE_DRAIN_SECONDS:
                    return False
            assert self._wake_r is not None
            watched[self._wake_r] = (None, None)
            if self._status_fd is not None:
                watched[self._status_fd] = (None, b"status")
            if self._shell_pidfd is not None:
                watched[self._shell_pidfd] = (None, b"exit")
            poll_for_exit = self._shell is not None and self._shell_pidfd is None
            for command in self._commands.values():
                if command.out_fd is not None:
                    watched[command.out_fd] = (command, STDOUT_MARKER)
                if command.err_fd is not None:
                    watched[command.err_fd] = (command, STDERR_MARKER)
            timeout = self._next_deadline(now)
            if poll_for_exit:  # no pidfd (old kernel): look at the shell now and then
                timeout = min(timeout if timeout is not None else math.inf, SHELL_EXIT_POLL_SECONDS)
        poller = select.poll()
        for descriptor in watched:
            poller.register(descriptor, select.POLLIN)
        events = poller.poll(None if timeout is None else max(timeout, 0) * 1000)
        for descriptor, _ in events:
            command, marker = watched[descriptor]
            # A descriptor closed earlier in this round may already be reused by another thread: only
            # act on descriptors that are still the current ones.
            if descriptor == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(descriptor, 4096)
            elif marker == b"status":
                if descriptor == self._status_fd:
                    self._read_status(descriptor)
            elif marker == b"exit":
                if descriptor == self._shell_pidfd:
                    self._shell_exited()
            elif (
                command is not None and marker is not None and descriptor in (command.out_fd, command.err_fd)
            ):
                self._read_output(command, descriptor, marker)
        shell = self._shell
        if poll_for_exit and shell is not None and shell.poll() is not None:
            self._shell_exited()
        with self._cond:
            self._settle_commands(time.monotonic())
        return True

    def _next_deadline(self, now: float) -> float | None:
        deadlines: list[float] = []
        if self._closed and self._closed_at is not None:
            deadlines.append(self._closed_at + CLOSE_DRAIN_SECONDS - now)
        for command in self._commands.values():
            if command.complete or command.exited_at is None:
                continue
            quiet_since = max(command.exited_at, command.last_output_at)
            settle_at = min(quiet_since + DRAIN_IDLE_SECONDS, command.exited_at + DRAIN_MAX_SECONDS)
            deadlines.append(settle_at - now)
        return min(deadlines) if deadlines else None

    def _read_output(self, command: SessionCommand, descriptor: int, marker: bytes) -> None:
        try:
            chunk = os.read(descriptor, READ_CHUNK_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        with self._cond:
            if not chunk:
                os.close(descriptor)
                if command.out_fd == descriptor:
                    command.out_fd = None
                else:
                    command.err_fd = None
            else:
                command.last_output_at = time.monotonic()
                self._append_log(command, marker + chunk)

    def _append_log(self, command: SessionCommand, data: bytes) -> None:
        """Called with the lock held."""
        if command.log_fd is None:
            return
        try:
            os.write(command.log_fd, data)
        except OSError:
            logger.exception("cannot write the log of command %s", command.id)
            return
        command.log_size += len(data)
        self._cond.notify_all()

    def _read_status(self, descriptor: int) -> bool:
        """Read and record status lines; False when nothing was there (or the pipe ended)."""
        try:
            chunk = os.read(descriptor, 4096)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._shell_died()
            return False
        self._status_buffer += chunk
        while b"\n" in self._status_buffer:
            line, _, rest = bytes(self._status_buffer).partition(b"\n")
            self._status_buffer[:] = rest
            self._record_status(line)
        return True

    def _record_status(self, line: bytes) -> None:
        try:
            key_text, code_text = line.decode().split()
            key, code = int(key_text), int(code_text)
        except ValueError:
            logger.warning("session %s: unexpected status line %r", self.id, line)
            return
        with self._cond:
            while self._pending:
                command = self._pending.popleft()
                if command.key == key:
                    self._mark_exited(command, code)
                    break
                # An earlier command without a status line: its shell state was lost (should not happen).
                self._mark_exited(command, 1)

    def _shell_exited(self) -> None:
        """The shell process is gone: take the status lines it wrote last, then settle its commands."""
        while self._status_fd is not None and self._read_status(self._status_fd):
            pass
        self._shell_died()

    def _shell_died(self) -> None:
        shell = self._shell
        if shell is None:
            return
        returncode = shell.wait()
        with self._cond:
            for stream in (shell.stdin, shell.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            if self._shell_pidfd is not None:
                os.close(self._shell_pidfd)
                self._shell_pidfd = None
            self._shell = None
            self._status_fd = None
            pending = list(self._pending)
            self._pending.clear()
            for command in pending:
                self._mark_exited(command, returncode)
            self._cond.notify_all()

    def _mark_exited(self, command: SessionCommand, returncode: int) -> None:
        """Called with the lock held; `returncode` is subprocess-style (negative = killed by a signal)."""
        command.exit_code, command.termination = classify(
            returncode, oom=command.oom, kind="session", command=command.command
        )
        command.exited_at = time.monotonic()
        self._cond.notify_all()

    def _settle_commands(self, now: float) -> None:
        """Called with the lock held: complete commands whose output is drained, release their FIFOs."""
        for command in self._commands.values():
            if command.complete:
                if command.out_fd is None and command.err_fd is None and command.log_fd is not None:
                    os.close(command.log_fd)
                    command.log_fd = None
                continue
            if command.exited_at is None:
                if self._closed:
                    # Killed before it ever reported a status.
                    self._mark_exited(command, -signal.SIGKILL)
                continue
            drained = command.out_fd is None and command.err_fd is None
            quiet_since = max(command.exited_at, command.last_output_at)
            quiet = now - quiet_since >= DRAIN_IDLE_SECONDS
            if drained or quiet or now - command.exited_at >= DRAIN_MAX_SECONDS:
                self._complete(command)

    def _complete(self, command: SessionCommand) -> None:
        command.complete = True
        if command.in_fd is not None:
            os.close(command.in_fd)  # background readers of stdin now see EOF
            command.in_fd = None
        for path in command.fifo_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._cond.notify_all()

    def _shutdown_pump(self) -> None:
        with self._cond:
            for command in self._commands.values():
                if command.exited_at is None:
                    self._mark_exited(command, -signal.SIGKILL)
                if not command.complete:
                    self._complete(command)
                for name in ("out_fd", "err_fd", "log_fd"):
                    descriptor = getattr(command, name)
                    if descriptor is not None:
                        with contextlib.suppress(OSError):
                            os.close(descriptor)
                        setattr(command, name, None)
            for name in ("_wake_r", "_wake_w"):
                descriptor = getattr(self, name)
                if descriptor is not None:
                    with contextlib.suppress(OSError):
                        os.close(descriptor)
                    setattr(self, name, None)
            self._cond.notify_all()

    # -- log following ------------------------------------------------------------------------------

    def follow(self, command: SessionCommand, ws: WebSocket, offset: int, follow: bool) -> None:
        """Stream the command's marked log from `offset` until it completes, then close with 1000."""
        sent = offset
        while True:
            with self._cond:
                if follow and command.log_size <= sent and not command.complete:
                    self._cond.wait(FOLLOW_POLL_SECONDS)
                available = command.log_size
                complete = command.complete
            while sent < available:
                chunk = self.read_log(command, sent, min(available - sent, LOG_FRAME_BYTES))
                if not chunk:
                    break
                try:
                    ws.send_bytes(chunk)
                except ConnectionClosed:
                    return
                sent += len(chunk)
            if (complete or not follow) and sent >= available:
                ws.close(CLOSE_NORMAL)
                return
            if _client_left(ws):
                return


def _pidfd_open(pid: int) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return int(pidfd_open(pid))
    except OSError:  # ENOSYS on old kernels or sandboxes that filter the syscall
        return None


def _client_left(ws: WebSocket) -> bool:
    """Answer pings and notice a client close without blocking."""
    while True:
        try:
            event = ws.receive(timeout=0)
        except TimeoutError:
            return False
        if isinstance(event, Close):
            return True
