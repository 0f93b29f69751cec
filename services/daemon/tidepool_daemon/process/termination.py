"""Why a process ended, as the structured `termination` field exec responses and session commands carry.

`{"reason": "exited" | "signal" | "timeout" | "oom_killed", "signal": int | null}` (a Tidepool extension the
SDK ignores):

* `exited`: the shell ended on its own; `exitCode` is its status. A child killed by a signal shows up here
  as the shell's conventional 128+N status, because the shell outlived it.
* `signal`: the shell itself was killed by `signal` (e.g. `kill -9 $$`, or a PTY killed by DELETE).
* `timeout`: the daemon killed the process group because the request's timeout expired (SIGKILL).
* `oom_killed`: killed by SIGKILL (directly, or a child while the shell reported 137) while the cgroup's
  `oom_kill` counter went up; `signal` is 9.

The OOM counter comes from cgroup v2 `memory.events` (`oom_kill N`) or v1 `memory.oom_control`, found
through `/proc/self/cgroup`. `TIDEPOOL_DAEMON_OOM_EVENTS_FILE` points somewhere else (tests, unusual
mounts).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import bad_request
from ..httpd.http_io import Request, Response, json_response

TerminationReason = Literal["exited", "signal", "timeout", "oom_killed"]

OOM_EVENTS_FILE_ENV = "TIDEPOOL_DAEMON_OOM_EVENTS_FILE"
_CGROUP_ROOT = "/sys/fs/cgroup"
_SIGKILL_STATUS = 128 + signal.SIGKILL


@dataclass(frozen=True)
class Termination:
    reason: TerminationReason
    signal: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "signal": self.signal}


def _candidate_files() -> list[str]:
    override = os.environ.get(OOM_EVENTS_FILE_ENV)
    if override:
        return [override]
    candidates: list[str] = []
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as cgroup_file:
            lines = cgroup_file.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.rstrip("/")
        if controllers == "":  # cgroup v2 unified hierarchy
            candidates.append(f"{_CGROUP_ROOT}{path}/memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(f"{_CGROUP_ROOT}/memory{path}/memory.oom_control")
    # Inside a container with its own cgroup namespace the paths above may not be mounted as such.
    candidates.extend((f"{_CGROUP_ROOT}/memory.events", f"{_CGROUP_ROOT}/memory/memory.oom_control"))
    return candidates


def oom_kill_count() -> int | None:
    """The cgroup's `oom_kill` counter, or None when this kernel/cgroup setup does not expose one."""
    for path in _candidate_files():
        try:
            with open(path, encoding="utf-8") as events:
                for line in events:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value.strip())
        except (OSError, ValueError):
            continue
    return None


class OomWatch:
    """Takes the `oom_kill` counter when a process starts, to tell later whether an OOM kill happened."""

    def __init__(self) -> None:
        self._before = oom_kill_count()

    def fired(self) -> bool:
        if self._before is None:
            return False
        after = oom_kill_count()
        return after is not None and after > self._before


class TerminationLog:
    """The most recent process endings, numbered, for the runner to collect (`GET /process/terminations`)."""

    CAPACITY = 1000
    COMMAND_PREVIEW = 200

    def __init__(self) -> None:
        self.boot_id = str(uuid.uuid4())
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.CAPACITY)
        self._sequence = 0
        self._lock = threading.Lock()

    def record(self, kind: str, command: str, exit_code: int, termination: Termination) -> None:
        with self._lock:
            self._sequence += 1
            self._records.append(
                {
                    "sequence": self._sequence,
                    "kind": kind,
                    "command": command[: self.COMMAND_PREVIEW],
                    "exitCode": exit_code,
                    "endedAt": time.time(),
                    **termination.as_dict(),
                }
            )

    def after(self, sequence: int) -> list[dict[str, Any]]:
        with self._lock:
            return [record for record in self._records if record["sequence"] > sequence]


TERMINATIONS = TerminationLog()


def classify(
    returncode: int,
    *,
    timed_out: bool = False,
    oom: OomWatch | None = None,
    kind: str | None = None,
    command: str = "",
) -> tuple[int, Termination]:
    """(exit code as reported to clients, termination) for a `subprocess`-style return code (-N = signal).
    With `kind`, the ending is also recorded in TERMINATIONS."""
    exit_code, termination = _classify(returncode, timed_out, oom)
    if kind is not None:
        TERMINATIONS.record(kind, command, exit_code, termination)
    return exit_code, termination


def _classify(returncode: int, timed_out: bool, oom: OomWatch | None) -> tuple[int, Termination]:
    if timed_out:
        return _SIGKILL_STATUS, Termination("timeout", signal.SIGKILL)
    killed = returncode in (-signal.SIGKILL, _SIGKILL_STATUS)
    if killed and oom is not None and oom.fired():
        return _SIGKILL_STATUS, Termination("oom_killed", signal.SIGKILL)
    if returncode < 0:
        # Shell convention for a signal death (128 + n); the real signal is in `termination.signal`.
        return 128 - returncode, Termination("signal", -returncode)
    return returncode, Termination("exited", None)


def list_terminations(request: Request) -> Response:
    """`GET /process/terminations?after=N`: endings recorded since sequence N (the runner polls this)."""
    raw = request.query_value("after") or "0"
    if not raw.isdigit():
        raise bad_request("after must be a non-negative integer")
    return json_response(200, {"bootId": TERMINATIONS.boot_id, "records": TERMINATIONS.after(int(raw))})
