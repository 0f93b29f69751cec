"""Run user-controlled work in a child process bounded in CPU time, memory, wall-clock time and output size.

Why (issue #7 item 8): the daemon serves every connection on a thread of one Python process. Work whose
cost the user controls (content search, name search, search-and-replace, listing a huge folder) used to
run on that thread: a catastrophic regular expression held the GIL inside `re` for 35 minutes and every
other toolbox call of the sandbox hung behind it. A thread cannot be stopped; a process can. So that work
runs in a child (`bounded_job.py`, the sandbox's python3 with `-I -S`, stdlib only) that the request's
thread watches:

- CPU time: `RLIMIT_CPU` of `cpu_seconds` (soft: SIGXCPU, the job stops and cleans up; hard, one second
  later: SIGKILL);
- memory: `RLIMIT_AS` of `memory_bytes` (allocations fail, the job stops with MemoryError);
- wall-clock time: past `wall_seconds` the child gets SIGTERM (it cleans up), then SIGKILL;
- output: the result is spooled (in memory, then in an unlinked temporary file; in memory up to 64 MiB if
  the disk is full) so the status can still be chosen once the job has ended; past `output_bytes` the child
  is killed;
- concurrency: at most `concurrency` jobs at once; a request waits for a slot up to `wall_seconds`.

Past a bound the request gets a 4xx in the daemon's error envelope whose message names the bound and its
value, chosen by what a Daytona SDK user already handles:

- 408 `TIME_LIMIT_EXCEEDED` (CPU or wall clock): the SDK raises `DaytonaTimeoutError`, exactly as for an
  `exec` that outlives its timeout (also 408);
- 422 `MEMORY_LIMIT_EXCEEDED` / `OUTPUT_LIMIT_EXCEEDED`: `DaytonaUnprocessableEntityError`; the request
  is valid but too big to answer within the bound, and repeating it will not help (unlike a 5xx);
- 429 `TOO_MANY_OPERATIONS` when no slot frees up in time: `DaytonaRateLimitError`.

The child runs as the sandbox user like the worker, so it can read and write only what the user can. The
bounds come from the daemon's environment (`TIDEPOOL_DAEMON_JOB_CPU_SECONDS`, `..._WALL_SECONDS`,
`..._MEMORY_MIB`, `..._OUTPUT_MIB`, `..._CONCURRENCY`), read once at start; they only ever affect the
sandbox whose environment sets them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from ..errors import (
    MEMORY_LIMIT_EXCEEDED,
    OUTPUT_LIMIT_EXCEEDED,
    TIME_LIMIT_EXCEEDED,
    TOO_MANY_OPERATIONS,
    DaemonError,
)
from ..httpd.http_io import READ_CHUNK_SIZE, Response, stream_response
from .bounded_job import EXIT_DAEMON_ERROR, EXIT_OK, EXIT_OUT_OF_MEMORY, EXIT_STOPPED
from .own_python import own_python

MIB = 1024 * 1024

# services/daemon (the folder holding tidepool_daemon/), three levels above this file.
_DAEMON_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from tidepool_daemon.process.bounded_job import main; main()"
)
# Results up to this size stay in memory; larger ones go to an unlinked temporary file.
_SPOOL_IN_MEMORY_BYTES = 4 * MIB
# When no temporary file can be made (a full disk), results up to this size are still kept in memory.
_SPOOL_MEMORY_FALLBACK_BYTES = 64 * MIB
_MAX_STDERR_BYTES = 64 * 1024
# After SIGTERM, how long the job may take to clean up (e.g. remove a half-written file) before SIGKILL.
_TERM_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Bounds:
    cpu_seconds: int = 60
    wall_seconds: float = 120.0
    memory_bytes: int = 512 * MIB
    output_bytes: int = 256 * MIB
    concurrency: int = 4

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Bounds:
        defaults = cls()

        def number(name: str, default: float) -> float:
            raw = environ.get(f"TIDEPOOL_DAEMON_JOB_{name}", "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                return default
            return value if value > 0 else default

        return cls(
            cpu_seconds=max(1, int(number("CPU_SECONDS", defaults.cpu_seconds))),
            wall_seconds=number("WALL_SECONDS", defaults.wall_seconds),
            memory_bytes=int(number("MEMORY_MIB", defaults.memory_bytes / MIB) * MIB),
            output_bytes=int(number("OUTPUT_MIB", defaults.output_bytes / MIB) * MIB),
            concurrency=max(1, int(number("CONCURRENCY", defaults.concurrency))),
        )


BOUNDS = Bounds.from_environment()
_slots = threading.BoundedSemaphore(BOUNDS.concurrency)


def run_bounded(kind: str, params: dict[str, Any], *, what: str, bounds: Bounds = BOUNDS) -> Response:
    """Run job `kind` (see bounded_job.JOBS) on `params` (JSON-serialisable) and answer with its output.

    `what` names the operation in error messages ("find", "search"...). Returns a 200 JSON response
    streamed from the spooled output. Raises DaemonError: the job's own error (e.g. 404), or 408/422/429
    past a bound (see the module docstring), or 500 if the job crashed.
    """
    if not _slots.acquire(timeout=bounds.wall_seconds):
        raise DaemonError(
            429,
            f"{what}: more than {bounds.concurrency} searches, replacements or large listings are running "
            f"in this sandbox and none finished within {bounds.wall_seconds:g} s; retry later",
            TOO_MANY_OPERATIONS,
        )
    try:
        spool, size = _run_child(kind, params, what, bounds)
    finally:
        _slots.release()
    return stream_response(200, "application/json", _drain(spool), content_length=size)


def _run_child(kind: str, params: dict[str, Any], what: str, bounds: Bounds) -> tuple[_Spool, int]:
    request = json.dumps(
        {
            "kind": kind,
            "params": params,
            "limits": {"cpu_seconds": bounds.cpu_seconds, "memory_bytes": bounds.memory_bytes},
        },
        ensure_ascii=False,
    ).encode("utf-8", "surrogatepass")
    try:
        child = subprocess.Popen(
            [
                *own_python(),
                "-I",
                "-S",
                "-X",
                f"pycache_prefix={_bytecode_cache()}",
                "-c",
                _BOOTSTRAP,
                _DAEMON_ROOT,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
    except OSError as exc:
        raise DaemonError(500, f"{what}: cannot start the worker process: {exc}") from None
    spool = _Spool()
    try:
        outcome = _Watch(child, spool, bounds).run(request)
        _raise_for_outcome(outcome, what, bounds)
    except BaseException:
        spool.close()
        raise
    return spool, spool.rewind()


def _bytecode_cache() -> str:
    """Where the job process keeps compiled modules. The daemon is mounted read-only without bytecode
    (its python3 is the image's, of any version), so without a cache every job would compile every module
    again: most of its start-up. The user's own cache folder: the job runs as the user, so nothing written
    there can run with more rights than its author's (the worker, which imports as root, never uses it)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "tidepool-daemon", "bytecode")


@dataclass
class _Outcome:
    status: int  # the child's exit status (negative: killed by that signal)
    cpu_seconds: float
    stderr: bytes
    wall_exceeded: bool = False
    output_exceeded: bool = False
    spool_error: str = ""


class _Watch:
    """Feeds the request, spools stdout, keeps stderr, and enforces the wall-clock and output bounds."""

    def __init__(self, child: subprocess.Popen[bytes], spool: _Spool, bounds: Bounds) -> None:
        self._child = child
        self._spool = spool
        self._bounds = bounds
        self._stderr = bytearray()
        self._written = 0

    def run(self, request: bytes) -> _Outcome:
        child = self._child
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        deadline = time.monotonic() + self._bounds.wall_seconds
        wall_exceeded = output_exceeded = False
        spool_error = ""
        pending = memoryview(request)
        # Written as the child reads it, under the same deadline (a stopped child never reads).
        os.set_blocking(child.stdin.fileno(), False)
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdin, selectors.EVENT_WRITE, "in")
            selector.register(child.stdout, selectors.EVENT_READ, "out")
            selector.register(child.stderr, selectors.EVENT_READ, "err")
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    wall_exceeded = True
                    break
                for key, _events in selector.select(timeout=remaining):
                    if key.data == "in":
                        try:
                            pending = pending[os.write(key.fd, pending[:READ_CHUNK_SIZE]) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # the child ended early; its status tells why
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(key.fileobj)
                            with contextlib.suppress(OSError):
                                child.stdin.close()
                        continue
                    chunk = os.read(key.fd, READ_CHUNK_SIZE)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.data == "err":
                        self._stderr += chunk[: max(0, _MAX_STDERR_BYTES - len(self._stderr))]
                    elif not (output_exceeded or spool_error):
                        self._written += len(chunk)
                        if self._written > self._bounds.output_bytes:
                            output_exceeded = True
                            _kill(child, signal.SIGKILL)
                            continue
                        try:
                            self._spool.write(chunk)
                        except OSError as exc:  # no room for the temporary file
                            spool_error = str(exc)
                            _kill(child, signal.SIGKILL)
        status, cpu_seconds, overran = self._reap(deadline)
        for pipe in (child.stdin, child.stdout, child.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        return _Outcome(
            status, cpu_seconds, bytes(self._stderr), wall_exceeded or overran, output_exceeded, spool_error
        )

    def _reap(self, deadline: float) -> tuple[int, float, bool]:
        """Wait for the child until `deadline`, then SIGTERM it and SIGKILL it after a grace period.
        Returns its exit status, the CPU time it used and whether it had to be stopped."""
        child = self._child
        overran = False
        give_up = deadline
        while True:
            pid, wait_status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            now = time.monotonic()
            if now >= give_up:
                if not overran:
                    overran = True
                    _kill(child, signal.SIGTERM)
                    give_up = now + _TERM_GRACE_SECONDS
                else:
                    _kill(child, signal.SIGKILL)
                    give_up = float("inf")
            time.sleep(0.01)  # it has closed its pipes, so it is exiting or being stopped
        # Reaped here (wait4 gives the CPU time): tell Popen, so it never waits for this pid again.
        child.returncode = os.waitstatus_to_exitcode(wait_status)
        return child.returncode, usage.ru_utime + usage.ru_stime, overran


def _kill(child: subprocess.Popen[bytes], signum: int) -> None:
    # Only called before the child is reaped, so its pid is still its own.
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signum)


def _raise_for_outcome(outcome: _Outcome, what: str, bounds: Bounds) -> None:
    if outcome.output_exceeded:
        raise DaemonError(
            422,
            f"{what}: the result exceeds the output bound of {bounds.output_bytes // MIB} MiB; "
            "narrow the path or the pattern",
            OUTPUT_LIMIT_EXCEEDED,
        )
    if outcome.spool_error:
        raise DaemonError(
            507, f"{what}: no room to buffer the result: {outcome.spool_error}", "INSUFFICIENT_STORAGE"
        )
    if outcome.wall_exceeded:
        raise DaemonError(
            408,
            f"{what}: stopped at the wall-clock bound of {bounds.wall_seconds:g} s; "
            "narrow the path or the pattern",
            TIME_LIMIT_EXCEEDED,
        )
    status = outcome.status
    if status == EXIT_OK:
        return
    if status == EXIT_DAEMON_ERROR:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            error = json.loads(outcome.stderr.decode("utf-8", "replace").strip().splitlines()[-1])
            raise DaemonError(int(error["status"]), str(error["message"]), error.get("code"))
    out_of_cpu = outcome.cpu_seconds >= bounds.cpu_seconds - 0.05
    if status in (-signal.SIGXCPU, EXIT_STOPPED) or (status == -signal.SIGKILL and out_of_cpu):
        raise DaemonError(
            408,
            f"{what}: stopped at the CPU-time bound of {bounds.cpu_seconds} s; "
            "narrow the path or the pattern",
            TIME_LIMIT_EXCEEDED,
        )
    if status == EXIT_OUT_OF_MEMORY or b"MemoryError" in outcome.stderr:
        raise DaemonError(
            422,
            f"{what}: stopped at the memory bound of {bounds.memory_bytes // MIB} MiB; "
            "narrow the path or the pattern",
            MEMORY_LIMIT_EXCEEDED,
        )
    if status == -signal.SIGKILL:
        # A SIGKILL we did not send, before the CPU bound: most likely the kernel's OOM killer.
        raise DaemonError(
            422,
            f"{what}: killed before reaching its bounds, most likely because the sandbox ran out of memory",
            MEMORY_LIMIT_EXCEEDED,
        )
    tail = outcome.stderr.decode("utf-8", "replace").strip()[-2000:]
    raise DaemonError(500, f"{what} failed (worker exit status {status}): {tail}")


class _Spool:
    """A job's output: in memory up to _SPOOL_IN_MEMORY_BYTES, then in an unlinked temporary file; if no
    temporary file can be made (a full disk), in memory up to _SPOOL_MEMORY_FALLBACK_BYTES. `write` raises
    OSError when there is no room left."""

    def __init__(self) -> None:
        self._target: IO[bytes] = io.BytesIO()
        self._in_memory = True
        self._no_file = False
        self._size = 0

    def write(self, chunk: bytes) -> None:
        size = self._size + len(chunk)
        if self._in_memory and size > _SPOOL_IN_MEMORY_BYTES and not self._no_file:
            self._move_to_file()
        if self._in_memory and size > _SPOOL_MEMORY_FALLBACK_BYTES:
            raise OSError(errno.ENOSPC, "no temporary file can be made and the result is too big for memory")
        self._target.write(chunk)
        self._size = size

    def _move_to_file(self) -> None:
        try:
            file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        except OSError:
            self._no_file = True
            return
        try:
            file.write(self._target.getbuffer())  # type: ignore[attr-defined]
        except OSError:
            file.close()
            self._no_file = True
            return
        self._target = file
        self._in_memory = False

    def rewind(self) -> int:
        """Ready to be read from the start; returns the size."""
        self._target.seek(0)
        return self._size

    def read(self, size: int) -> bytes:
        return self._target.read(size)

    def close(self) -> None:
        self._target.close()


def _drain(spool: _Spool) -> Iterator[bytes]:
    try:
        while chunk := spool.read(READ_CHUNK_SIZE):
            yield chunk
    finally:
        spool.close()
