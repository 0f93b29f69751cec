"""Process trees: find everything one command, session or PTY started, and end it as one.

A tree is described by a `TreeSpec`:

* `roots`: processes the daemon started and has not reaped yet (so their pids cannot have been reused); a
  root that has exited stays a zombie while it is in `held` (see below), so the session it leads cannot
  empty and its id cannot be reused either: such a session is the tree's without reading any environment;
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

* `held`: exited roots the tree's owner deliberately left unreaped (`exit_status_unreaped`) until the tree
  is ended; `release` reaps them.

`kill_tree` first stops the process group of every session led by a root (one `killpg`, no scan: under a
fork bomb a scan of thousands of processes, competing with them for the CPU, takes so long that the
processes it saw are gone before their environment is read), then freezes the tree (SIGSTOP to every
member, repeated until a scan finds no new member, so a fork bomb cannot outrun it: a stopped process
cannot fork), then SIGKILLs every member; SIGKILL also ends processes that ignore SIGTERM and stopped
ones. Processes of other users (e.g. started through `sudo`) cannot be signalled by the daemon's user and
are skipped.

The OOM killer: everything the toolbox starts for the user gets `oom_score_adj` `USER_OOM_SCORE_ADJ`
(`expose_to_oom_killer`, inherited by what it starts), so when the sandbox runs out of memory (a fork bomb
reaches the memory limit about when it reaches the pid limit) the kernel ends the user's processes, not the
daemon, whose deadline reaper must survive to end the tree. Raising the score needs no privilege.
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
# The user's processes are chosen by the OOM killer before the daemon (0) whatever their size.
USER_OOM_SCORE_ADJ = 500

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
    held: set[int] = field(default_factory=set)

    def release(self) -> None:
        """Reap the exited roots this tree held (after `kill_tree`); their pids are free for reuse after."""
        for pid in sorted(self.held):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.roots.discard(pid)
        self.held.clear()

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


def expose_to_oom_killer(pid: int, proc_root: str = PROC_ROOT) -> None:
    """Give the daemon's new child `pid` `USER_OOM_SCORE_ADJ` (see the module docstring). Called right after
    the spawn, before the child is given work; best effort (a child that has already ended is skipped)."""
    with contextlib.suppress(OSError), open(f"{proc_root}/{pid}/oom_score_adj", "w") as score:
        score.write(str(USER_OOM_SCORE_ADJ))


def exit_status_unreaped(pid: int) -> int | None:
    """The exit status of the daemon's child `pid` as `Popen.returncode` gives it (the exit code, or minus
    the signal number), or None while it runs. The child is left a zombie (`WNOWAIT`): its pid, and the
    session it leads, stay reserved until it is reaped. Raises `ChildProcessError` if it was reaped."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def session_has_others(session: int, proc_root: str = PROC_ROOT) -> bool:
    """True when a process other than the leader `session` is in that session."""
    processes = snapshot(proc_root)
    return any(entry.session == session and pid != session for pid, entry in processes.items())


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
    began = time.monotonic()
    # Sessions led by an unreaped root are the tree's for sure: stop their process group before the first
    # scan, so a fork bomb in it stops multiplying and stops competing with the scan for the CPU.
    _signal_groups({session for session in spec.sessions if session in spec.roots}, signal.SIGSTOP)
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
        elapsed = time.monotonic() - began
        logger.info("ended %d processes of tree %s in %.1f s", len(killed), spec.marker, elapsed)
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
        """End `spec`'s tree at `deadline` (a `time.monotonic()` value), then reap its `held` roots."""
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
            finally:
                spec.release()


DEADLINE_REAPER = DeadlineReaper()
