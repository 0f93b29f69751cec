"""Process trees: find everything one command, session or PTY started, and end it as one.

A tree is described by a `TreeSpec`:

* `roots`: live processes the daemon started and has not reaped yet (so their pids cannot have been reused);
* `sessions`: session ids (`setsid`) the daemon's shells lead. A session id stays taken while any process
  is still in that session, even after its leader died; it counts once its leader is a root or one of its
  processes carries the marker (an emptied session's id may be reused by an unrelated one);
* `marker`: the value of `TREE_ENV` put into the environment of the tree's first process. Processes inherit
  it through `setsid`, `nohup`, double forks and daemonizing, which leave the process tree and the session.

Members are the processes matching any of those (the marker is read from `/proc/PID/environ`, the
environment a process started with), plus every descendant of a member by parent links.
Long-lived shells (session shells, PTY shells) are also child subreapers (`PR_SET_CHILD_SUBREAPER`, set by
`SUBREAPER_EXEC_HELPER` before it execs the shell, and kept across `execve`): orphans they leave behind are
re-parented to them rather than to the container's init, so they stay in the tree by parent links too.

`kill_tree` first freezes the tree (SIGSTOP to every member, repeated until a scan finds no new member, so
a fork bomb cannot outrun it: a stopped process cannot fork), then SIGKILLs every member; SIGKILL also ends
processes that ignore SIGTERM and stopped ones. Processes of other users (e.g. started through `sudo`)
cannot be signalled by the daemon's user and are skipped.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

logger = logging.getLogger("tidepool_daemon.proctree")

TREE_ENV = "TIDEPOOL_PROCESS_TREE"
PROC_ROOT = "/proc"
# A scan that keeps finding new members this many times in a row gives up freezing and kills what it has
# (then `kill_tree` scans again); only a pathological tree gets near it.
MAX_FREEZE_ROUNDS = 200
MAX_KILL_PASSES = 5

# Runs as `python3 -I -S -c SUBREAPER_EXEC_HELPER PROGRAM ARGS...`: marks itself a child subreaper (prctl
# PR_SET_CHILD_SUBREAPER = 36, kept across execve) and becomes PROGRAM. A separate process rather than a
# `preexec_fn`, which would make the (threaded, large) daemon fork instead of vfork.
# An image's python3 without ctypes still gets a working shell, only without the subreaper.
BECOME_SUBREAPER = (
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
)
SUBREAPER_EXEC_HELPER = BECOME_SUBREAPER + "import os, sys\nos.execv(sys.argv[1], sys.argv[1:])\n"


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    ppid: int
    session: int
    state: str


@dataclass
class TreeSpec:
    """What belongs to one tree (see the module docstring)."""

    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    roots: set[int] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with this tree's marker added (in place; returned for convenience)."""
        env[TREE_ENV] = self.marker
        return env


def parse_stat(text: str) -> ProcessEntry | None:
    """One `/proc/PID/stat` line. The command name is in parentheses and may itself hold spaces and
    parentheses, so the fields are taken after the last `)`."""
    head, separator, tail = text.rpartition(")")
    if not separator:
        return None
    pid_text = head.partition(" (")[0]
    fields = tail.split()
    try:
        # After the name: state, ppid, pgrp, session, ...
        return ProcessEntry(pid=int(pid_text), ppid=int(fields[1]), session=int(fields[3]), state=fields[0])
    except (ValueError, IndexError):
        return None


def snapshot(proc_root: str = PROC_ROOT) -> dict[int, ProcessEntry]:
    """Every process visible in `proc_root`, by pid. Processes that end during the scan are left out."""
    processes: dict[int, ProcessEntry] = {}
    try:
        names = os.listdir(proc_root)
    except OSError:
        return processes
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_root}/{name}/stat", encoding="utf-8", errors="replace") as stat_file:
                entry = parse_stat(stat_file.read())
        except OSError:
            continue
        if entry is not None:
            processes[entry.pid] = entry
    return processes


def has_marker(pid: int, marker: str, proc_root: str = PROC_ROOT) -> bool:
    """True when the process started with `TREE_ENV=marker` in its environment."""
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as environ:
            data = environ.read()
    except OSError:  # gone, or not ours to read (another user's process)
        return False
    return f"{TREE_ENV}={marker}".encode() in data.split(b"\0")


def members(
    spec: TreeSpec,
    processes: dict[int, ProcessEntry],
    proc_root: str = PROC_ROOT,
    known: Iterable[int] = (),
) -> set[int]:
    """The pids in `processes` that belong to the tree `spec` (see `resolve`)."""
    return resolve(spec, processes, proc_root, known)[0]


def resolve(
    spec: TreeSpec,
    processes: dict[int, ProcessEntry],
    proc_root: str = PROC_ROOT,
    known: Iterable[int] = (),
) -> tuple[set[int], set[int]]:
    """(member pids, trusted session ids) of the tree `spec` among `processes`. `known` members (from an
    earlier scan) are not checked again. Never the calling process, its ancestors or pid 1.

    A session id of `spec.sessions` is trusted only when its leader is one of `spec.roots` or one of its
    processes carries the marker: once a session has emptied, its id is free for reuse (pids wrap quickly
    with a small `pid_max`), and a new, unrelated session may have it."""
    protected = _protected_pids(processes)
    found = {pid for pid in known if pid in processes}
    trusted = {session for session in spec.sessions if session in spec.roots}
    unchecked = []
    # Candidate sessions first: usually their leader carries the marker, which settles the whole session
    # (a fork bomb's thousands of processes) without reading every environment.
    for pid, entry in processes.items():
        if pid in protected:
            continue
        candidate = entry.session in spec.sessions and entry.session not in trusted
        if candidate and has_marker(pid, spec.marker, proc_root):
            trusted.add(entry.session)
            found.add(pid)
            continue
        unchecked.append(pid)
    for pid in unchecked:
        if pid in found:
            continue
        if pid in spec.roots or processes[pid].session in trusted or has_marker(pid, spec.marker, proc_root):
            found.add(pid)
    children: dict[int, list[int]] = {}
    for pid, entry in processes.items():
        children.setdefault(entry.ppid, []).append(pid)
    pending = list(found)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found and child not in protected:
                found.add(child)
                pending.append(child)
    return found, trusted


def _protected_pids(processes: dict[int, ProcessEntry]) -> set[int]:
    protected = {1, 0}
    pid = os.getpid()
    while pid > 1 and pid not in protected:
        protected.add(pid)
        entry = processes.get(pid)
        if entry is None:
            break
        pid = entry.ppid
    return protected


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_tree(spec: TreeSpec, proc_root: str = PROC_ROOT) -> int:
    """Freeze, then SIGKILL every member of the tree; returns how many processes were signalled.

    Repeats while a scan after the kill still finds members (a fork that was under way during the freeze,
    a member that could not be stopped), up to `MAX_KILL_PASSES` times."""
    killed: set[int] = set()
    for _ in range(MAX_KILL_PASSES):
        frozen: set[int] = set()
        for _ in range(MAX_FREEZE_ROUNDS):
            current, trusted = resolve(spec, snapshot(proc_root), proc_root, known=frozen)
            # One call stops a whole process group in the kernel, faster than a fork bomb multiplies
            # (background jobs of a shell without job control stay in its group); the scan finds the rest.
            _signal_groups(trusted, signal.SIGSTOP)
            new = {pid for pid in current - frozen if pid not in killed}
            if not new:
                break
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            frozen |= new
        if not frozen:
            break
        _signal_groups(trusted, signal.SIGKILL)
        for pid in frozen:
            if _signal(pid, signal.SIGKILL):
                killed.add(pid)
        # Zombies keep their pid (and would be found again) until their parent reaps them.
        still_there = members(spec, snapshot(proc_root), proc_root) - killed
        if not any(_alive(pid, proc_root) for pid in still_there):
            break
    if killed:
        logger.info("ended %d processes of tree %s", len(killed), spec.marker)
    return len(killed)


def _signal_groups(groups: Iterable[int], signum: int) -> None:
    for group in groups:
        if group > 1:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signum)


def _alive(pid: int, proc_root: str) -> bool:
    try:
        with open(f"{proc_root}/{pid}/stat", encoding="utf-8", errors="replace") as stat_file:
            entry = parse_stat(stat_file.read())
    except OSError:
        return False
    return entry is not None and entry.state not in ("Z", "X")


def live_members(spec: TreeSpec, proc_root: str = PROC_ROOT) -> set[int]:
    """Members that are still running (not zombies)."""
    processes = snapshot(proc_root)
    return {pid for pid in members(spec, processes, proc_root) if processes[pid].state not in ("Z", "X")}


class DeadlineReaper:
    """Ends trees at their deadline: a command whose shell returned before its timeout may have left
    background processes (`server &`, a fork bomb); the timeout bounds them too.

    One long-lived thread serves every scheduled tree. `start` it before user commands run: once a fork bomb
    has taken every pid of the sandbox, no new thread could be started to end it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, TreeSpec]] = []
        self._counter = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tree-deadlines", daemon=True)
                self._thread.start()

    def schedule(self, spec: TreeSpec, deadline: float) -> None:
        """End `spec`'s tree at `deadline` (a `time.monotonic()` value)."""
        self.start()
        with self._lock:
            self._counter += 1
            heapq.heappush(self._heap, (deadline, self._counter, spec))
            self._lock.notify()

    def pending(self) -> int:
        with self._lock:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._heap:
                    self._lock.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._lock.wait(wait)
                    continue
                _, _, spec = heapq.heappop(self._heap)
            try:
                kill_tree(spec)
            except Exception:  # never let one bad scan end the thread and strand later deadlines
                logger.exception("cannot end tree %s at its deadline", spec.marker)


DEADLINE_REAPER = DeadlineReaper()
