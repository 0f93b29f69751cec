"""`POST /process/execute`: run one shell command and return its combined output and exit code.

Zombie reaping: the runner starts containers with an init process (`Init: true`, catatonit), which reaps
orphaned grandchildren. The daemon therefore never reaps globally (a `waitpid(-1)` loop would steal exit
statuses from `subprocess`) and never sets SIGCHLD to SIG_IGN; each command's shell is waited for here.

Background jobs (`server &`) may keep the output pipe open after the shell exits. The response does not
wait for them, but their pipe is never closed under them either (that would kill them with SIGPIPE on
their next write): it is handed to one shared drainer thread that discards what they still write and
closes the pipe at EOF.

`termination` says why the command ended (see `termination.py`), including OOM kills.

Standard input: the script reaches the shell on a separate pipe (`. /dev/fd/N`), and the command's own
stdin is `/dev/null`, so a command that reads stdin (`cat`) sees end-of-file at once instead of the rest
of the script.

Timeouts bound the whole process tree (`proctree.py`): when the timeout fires, every process the command
started is ended, including ones that left its process group or session (`setsid`, double forks,
`nohup`) and ones that ignore SIGTERM. When the shell returns before its timeout, whatever it left running
in the background is ended when the timeout expires (a command without a timeout may leave background
processes running for good).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from ..context import DaemonContext
from ..environment import effective_environment
from ..errors import PROCESS_EXECUTION_TIMEOUT, DaemonError, bad_request
from ..httpd.http_io import READ_CHUNK_SIZE, Request, Response, json_response
from .own_python import require_shell
from .proctree import (
    DEADLINE_REAPER,
    TreeSpec,
    exit_status_unreaped,
    expose_to_oom_killer,
    kill_tree,
    session_has_others,
)
from .termination import OomWatch, classify

# Like the SDK documents: the first available of bash and sh (users write bash syntax).
COMMAND_SHELL = next((shell for shell in ("/bin/bash", "/usr/bin/bash") if os.path.exists(shell)), "/bin/sh")
TIMEOUT_MESSAGE = "request timeout: command execution timeout"
# The whole output goes back in one JSON string; past this we keep draining but stop storing, so a
# chatty command (e.g. `yes` without a timeout) cannot exhaust the daemon's memory.
MAX_CAPTURED_OUTPUT_BYTES = 64 * 1024 * 1024
# How often to check whether the shell exited while its output pipe stays quiet.
_EXIT_CHECK_INTERVAL_SECONDS = 0.05
# A program that reports when the user's code starts (code_run's Python bootstrap) may take this long to get
# there before the timeout counts anyway (a machine too busy even for that).
STARTUP_MAX_SECONDS = 120.0
# After the shell exits, background children may still hold the pipe open (`sleep 30 &`). Collect what
# is already there, then stop once the pipe is idle this long, or after the overall cap.
_DRAIN_IDLE_SECONDS = 0.1
_DRAIN_MAX_SECONDS = 2.0
_STDIN_WRITE_SIZE = 64 * 1024

TerminationReason = Literal["exited", "signal", "timeout", "oom_killed"]


@dataclass(frozen=True)
class CommandOutcome:
    output: bytes
    exit_code: int
    reason: TerminationReason
    signal_number: int | None
    output_truncated: bool

    def termination(self) -> dict[str, Any]:
        return {"reason": self.reason, "signal": self.signal_number}


class ProcessService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context
        DEADLINE_REAPER.start()  # now, while threads can still be started (see DeadlineReaper)

    def execute(self, request: Request) -> Response:
        payload = request.json_object_body()
        command = payload.get("command")
        if not isinstance(command, str) or not command.strip():
            raise bad_request("command is required")
        cwd = self._context.resolve_cwd(payload.get("cwd"))
        env = self._build_env(payload.get("envs"))
        timeout_seconds = _parse_timeout(payload.get("timeout"))

        outcome = run_shell_command(command, cwd, env, timeout_seconds)
        if outcome.reason == "timeout":
            raise DaemonError(
                408, TIMEOUT_MESSAGE, PROCESS_EXECUTION_TIMEOUT, extra={"termination": outcome.termination()}
            )
        response: dict[str, Any] = {
            "result": outcome.output.decode("utf-8", "replace"),
            "exitCode": outcome.exit_code,
            "termination": outcome.termination(),
        }
        if outcome.output_truncated:
            response["outputTruncated"] = True
        return json_response(200, response)

    def _build_env(self, raw_envs: object) -> dict[str, str]:
        env = effective_environment(self._context)  # the container env plus `POST /env` changes
        if raw_envs is None:
            return env
        if not isinstance(raw_envs, dict):
            raise bad_request("envs must be an object of string values")
        for name, value in raw_envs.items():
            if not isinstance(value, str):
                raise bad_request(f"envs.{name} must be a string")
            if not name or "=" in name or "\x00" in name or "\x00" in value:
                raise bad_request(f"invalid environment variable name or value: {name!r}")
            env[name] = value
        return env


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for the daemon's child `pid` (readable once it has exited), None where unavailable."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _parse_timeout(raw_timeout: object) -> float | None:
    if raw_timeout is None:
        return None
    if isinstance(raw_timeout, bool) or not isinstance(raw_timeout, int | float):
        raise bad_request("timeout must be a number of seconds")
    # Like the reference daemon, zero or negative means "no timeout".
    return float(raw_timeout) if raw_timeout > 0 else None


def run_shell_command(
    command: str, cwd: str, env: dict[str, str], timeout_seconds: float | None
) -> CommandOutcome:
    """Run `command` as a script the shell sources from a pipe (so heredocs work), stdin at end-of-file,
    capturing stdout+stderr."""
    # The image's limit, not a server error: 400 naming what is missing (the SDK's DaytonaBadRequestError).
    require_shell(COMMAND_SHELL, "a command")
    tree = TreeSpec()
    script_read, script_write = os.pipe()
    try:
        shell = subprocess.Popen(
            [COMMAND_SHELL, "-c", f". /dev/fd/{script_read}", COMMAND_SHELL],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one pipe keeps stdout and stderr interleaved in write order
            cwd=cwd,
            env=tree.environment(dict(env)),
            start_new_session=True,  # own session: its id finds the whole tree (see proctree.py)
            close_fds=True,
            pass_fds=(script_read,),
        )
    except OSError as exc:
        os.close(script_write)
        raise DaemonError(500, f"failed to start command: {exc}") from None
    finally:
        os.close(script_read)
    script = command.encode("utf-8", "surrogatepass")
    return _ShellRun(shell, script, timeout_seconds, script_fd=script_write, tree=tree).wait()


class _ShellRun:
    """Feeds the script, collects output and enforces the timeout for one running shell.

    One poll loop handles both pipes so a large script cannot deadlock against a shell blocked on
    writing output, and no extra thread is left behind when a background child keeps stdin open.
    """

    def __init__(
        self,
        shell: subprocess.Popen[bytes],
        script: bytes,
        timeout_seconds: float | None,
        kind: str = "exec",
        script_fd: int | None = None,
        tree: TreeSpec | None = None,
        started_fd: int | None = None,
    ) -> None:
        """`script` goes to `script_fd` (a pipe's write end, then owned here) or else to the shell's stdin.
        `tree` is what a timeout ends; by default the shell's session. `started_fd` (a pipe's read end, then
        owned here): the timeout starts when the program writes to it (or closes it), not at spawn; until
        then only STARTUP_MAX_SECONDS bound it."""
        assert shell.stdout is not None
        expose_to_oom_killer(shell.pid)
        self._shell = shell
        self._kind = kind
        self._tree = tree if tree is not None else TreeSpec(roots={shell.pid}, sessions={shell.pid})
        self._tree.roots.add(shell.pid)
        self._tree.sessions.add(shell.pid)
        self._script_sink: Any = None
        if script_fd is None:
            assert shell.stdin is not None
            self._script_sink = shell.stdin
            script_fd = shell.stdin.fileno()
        self._pending_input = memoryview(script)
        self._script_preview = script[:200].decode("utf-8", "replace")
        self._timeout_seconds = timeout_seconds
        self._deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        self._started_fd = started_fd
        self._reaped = False
        self._output = bytearray()
        self._output_truncated = False
        self._oom = OomWatch()
        self._poller = select.poll()
        self._stdout_fd = shell.stdout.fileno()
        self._stdin_fd: int | None = script_fd
        os.set_blocking(self._stdin_fd, False)
        self._poller.register(self._stdout_fd, select.POLLIN)
        self._poller.register(self._stdin_fd, select.POLLOUT)
        if started_fd is not None:
            self._poller.register(started_fd, select.POLLIN)
            if timeout_seconds is not None:
                self._deadline = time.monotonic() + STARTUP_MAX_SECONDS + timeout_seconds

    def wait(self) -> CommandOutcome:
        self._reached_eof = False
        timed_out = True
        try:
            timed_out = self._pump_until_done()
            if not timed_out:
                timed_out = self._wait_for_shell_exit()
        finally:
            if not timed_out and self._deadline is not None:
                # The shell returned in time; what it left in the background ends at the deadline. While
                # something is left in its session the shell stays an unreaped zombie until then, so the
                # session id cannot be reused and names the tree without a scan (see proctree.py); the
                # reaper reaps it after ending the tree. Otherwise only the marker finds leftovers.
                leftovers = TreeSpec(marker=self._tree.marker, sessions=set(self._tree.sessions))
                if not self._reaped and session_has_others(self._shell.pid):
                    leftovers.roots.add(self._shell.pid)
                    leftovers.held.add(self._shell.pid)
                else:
                    self._reap()
                DEADLINE_REAPER.schedule(leftovers, self._deadline)
            else:
                self._reap()
            self._close_stdin()
            if self._started_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._started_fd)
                self._started_fd = None
            assert self._shell.stdout is not None
            if self._reached_eof:
                self._shell.stdout.close()
            else:
                BACKGROUND_DRAINER.adopt(self._shell.stdout)  # a background job still holds the pipe
        exit_code, termination = classify(
            self._shell.returncode,
            timed_out=timed_out,
            oom=self._oom,
            kind=self._kind,
            command=self._script_preview,
        )
        return CommandOutcome(
            bytes(self._output), exit_code, termination.reason, termination.signal, self._output_truncated
        )

    def _exited(self) -> bool:
        """True once the shell has exited; it is left unreaped (see `wait`), its status in `returncode`."""
        if self._shell.returncode is None:
            try:
                self._shell.returncode = exit_status_unreaped(self._shell.pid)
            except ChildProcessError:  # reaped elsewhere (cannot happen: nothing here waits globally)
                self._shell.returncode = -signal.SIGKILL
                self._reaped = True
        return self._shell.returncode is not None

    def _reap(self) -> None:
        if self._reaped:
            return
        self._reaped = True
        try:
            _, status = os.waitpid(self._shell.pid, 0)
        except ChildProcessError:
            return
        if self._shell.returncode is None:
            self._shell.returncode = os.waitstatus_to_exitcode(status)

    def _pump_until_done(self) -> bool:
        """Move data until the output pipe is finished with; returns True if the timeout fired first."""
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if exited_at is None and self._exited():
                exited_at = now
                self._close_stdin()
            if exited_at is None:
                if self._deadline is not None and now >= self._deadline:
                    self._kill_process_group()
                    return True
                wait_seconds = _EXIT_CHECK_INTERVAL_SECONDS
                if self._deadline is not None:
                    wait_seconds = min(wait_seconds, self._deadline - now)
            else:
                if now - exited_at >= _DRAIN_MAX_SECONDS:
                    return False
                wait_seconds = _DRAIN_IDLE_SECONDS

            received_output = False
            for descriptor, events in self._poller.poll(max(wait_seconds, 0) * 1000):
                if descriptor == self._stdout_fd:
                    chunk = os.read(self._stdout_fd, READ_CHUNK_SIZE)
                    if not chunk:
                        self._reached_eof = True
                        return False  # EOF: no process holds the pipe any more
                    self._capture(chunk)
                    received_output = True
                elif descriptor == self._stdin_fd:
                    self._feed_stdin(events)
                elif descriptor == self._started_fd:
                    self._program_started()
            if exited_at is not None and not received_output:
                return False  # shell gone and the pipe went quiet: leftovers belong to background jobs

    def _wait_for_shell_exit(self) -> bool:
        """The output pipe closed; the shell itself may still be running (e.g. it closed stdout). An exiting
        shell closes its pipes a moment before it becomes waitable: its pidfd wakes this at that moment
        instead of a whole check interval later (which was most of a short command's round trip)."""
        pidfd = _open_pidfd(self._shell.pid)
        try:
            while not self._exited():
                wait_seconds = _EXIT_CHECK_INTERVAL_SECONDS
                if self._deadline is not None:
                    wait_seconds = min(wait_seconds, self._deadline - time.monotonic())
                    if wait_seconds <= 0:
                        self._kill_process_group()
                        return True
                if pidfd is None:
                    time.sleep(wait_seconds)
                else:
                    select.select([pidfd], [], [], wait_seconds)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return False

    def _program_started(self) -> None:
        """The user's code starts now (or the program closed the pipe): the timeout counts from here."""
        assert self._started_fd is not None
        self._poller.unregister(self._started_fd)
        with contextlib.suppress(OSError):
            os.close(self._started_fd)
        self._started_fd = None
        if self._timeout_seconds is not None:
            self._deadline = time.monotonic() + self._timeout_seconds

    def _feed_stdin(self, events: int) -> None:
        if events & (select.POLLERR | select.POLLHUP) or self._stdin_fd is None:
            self._close_stdin()
            return
        try:
            written = os.write(self._stdin_fd, self._pending_input[:_STDIN_WRITE_SIZE])
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the shell exited without reading the whole script
            self._close_stdin()
            return
        self._pending_input = self._pending_input[written:]
        if not self._pending_input:
            self._close_stdin()  # EOF ends the script

    def _close_stdin(self) -> None:
        if self._stdin_fd is None:
            return
        self._poller.unregister(self._stdin_fd)
        with contextlib.suppress(OSError):
            if self._script_sink is not None:
                self._script_sink.close()
            else:
                os.close(self._stdin_fd)
        self._stdin_fd = None

    def _capture(self, chunk: bytes) -> None:
        room = MAX_CAPTURED_OUTPUT_BYTES - len(self._output)
        if len(chunk) > room:
            self._output_truncated = True
            chunk = chunk[: max(room, 0)]
        self._output += chunk

    def _kill_process_group(self) -> None:
        """The timeout fired: end the shell and everything it started (see proctree.py)."""
        kill_tree(self._tree)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._shell.pid, signal.SIGKILL)  # in case /proc could not be read
        self._reap()


class _BackgroundDrainer:
    """Reads and discards output pipes still held by background jobs, closing each at EOF.

    One thread serves every adopted pipe; it starts on demand and ends when none is left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pipes: dict[int, Any] = {}
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def adopt(self, pipe: Any) -> None:
        with self._lock:
            self._pipes[pipe.fileno()] = pipe
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_w, False)
                self._thread = threading.Thread(target=self._run, name="background-drain", daemon=True)
                try:
                    self._thread.start()
                except RuntimeError:
                    # No thread can be started (the sandbox's pids are exhausted, e.g. a fork bomb): let
                    # go of the pipe rather than fail the request; its writers get EPIPE from now on.
                    self._thread = None
                    del self._pipes[pipe.fileno()]
                    pipe.close()
                    os.close(self._wake_r)
                    os.close(self._wake_w)
            else:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pipes:
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                    self._thread = None
                    return
                descriptors = [self._wake_r, *self._pipes]
            poller = select.poll()
            for descriptor in descriptors:
                poller.register(descriptor, select.POLLIN)
            for descriptor, _ in poller.poll():
                try:
                    chunk = os.read(descriptor, READ_CHUNK_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if descriptor == self._wake_r or chunk:
                    continue
                with self._lock:
                    pipe = self._pipes.pop(descriptor)
                with contextlib.suppress(OSError):
                    pipe.close()


BACKGROUND_DRAINER = _BackgroundDrainer()
