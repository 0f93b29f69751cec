"""Process trees (`proctree.py`): finding every process a command started and ending them as one, plus the
toolbox behaviours built on it (timeouts, session deletion, stdin) against the real daemon."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import polling
from tidepool_daemon.process import proctree
from tidepool_daemon.process.proctree import (
    TREE_ENV,
    DeadlineReaper,
    ProcessEntry,
    TreeSpec,
    kill_tree,
    members,
)

GENEROUS_SECONDS = 30.0


def processes_with(token: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `token`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                if token.encode() not in cmdline.read():
                    continue
            with open(f"/proc/{name}/stat") as stat:
                entry = proctree.parse_stat(stat.read())
        except OSError:
            continue
        if entry is not None and entry.state not in ("Z", "X"):
            found.append(int(name))
    return found


def wait_until(condition, what: str, within: float = GENEROUS_SECONDS) -> None:  # type: ignore[no-untyped-def]
    polling.wait_until(condition, what, timeout=within, interval=0.1)


def unique_sleep() -> str:
    """A `sleep` argument no other process uses, to find exactly the processes a test started."""
    return f"{600 + uuid.uuid4().int % 100000}.{uuid.uuid4().int % 1000:03d}"


@pytest.fixture
def cleanup_token() -> Iterator[list[str]]:
    tokens: list[str] = []
    yield tokens
    for token in tokens:  # never leave a test's processes behind, whatever happened
        for pid in processes_with(token):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# ----- parsing and membership ------------------------------------------------------------------------------


def test_parse_stat_takes_fields_after_the_last_parenthesis() -> None:
    entry = proctree.parse_stat("4242 (we(ird) name)) S 17 4242 4240 0 -1 4194560 98 0 0 0")
    assert entry == ProcessEntry(pid=4242, ppid=17, session=4240, state="S")
    assert proctree.parse_stat("garbage") is None


def fake_proc(root: Path, pid: int, ppid: int, session: int, environ: dict[str, str] | None = None) -> None:
    directory = root / str(pid)
    directory.mkdir()
    (directory / "stat").write_text(f"{pid} (sh) S {ppid} {pid} {session} 0 -1 0\n")
    if environ is not None:
        (directory / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))


def test_members_are_roots_sessions_markers_and_their_descendants(tmp_path: Path) -> None:
    spec = TreeSpec(roots={100}, sessions={200})
    fake_proc(tmp_path, 100, 50, 50)  # a root
    fake_proc(tmp_path, 101, 100, 50)  # its child
    fake_proc(tmp_path, 102, 101, 102)  # a grandchild that called setsid
    fake_proc(tmp_path, 200, 1, 200, {TREE_ENV: spec.marker})  # a session leader of the tree
    fake_proc(tmp_path, 201, 1, 200)  # an orphan in that session, its environment cleared
    fake_proc(tmp_path, 300, 1, 300, {TREE_ENV: spec.marker, "A": "b"})  # double-forked and setsid
    fake_proc(tmp_path, 301, 300, 301)  # its child
    fake_proc(tmp_path, 400, 1, 400, {TREE_ENV: "another-tree"})  # another command's
    fake_proc(tmp_path, 401, 1, 401, {"X": f"{TREE_ENV}={spec.marker}x"})  # only looks alike
    found = members(spec, proctree.snapshot(str(tmp_path)), str(tmp_path))
    assert found == {100, 101, 102, 200, 201, 300, 301}


def test_a_session_id_counts_only_while_the_tree_is_in_it(tmp_path: Path) -> None:
    """Once a session emptied, its id may be taken by an unrelated session: that one is not the tree's."""
    spec = TreeSpec(sessions={500, 600})
    fake_proc(tmp_path, 500, 1, 500, {TREE_ENV: "someone-else"})  # reused id, another tree's leader
    fake_proc(tmp_path, 501, 500, 500, {})
    fake_proc(tmp_path, 601, 1, 600, {})  # leader gone, unmarked: cannot tell, so left alone
    found, trusted = proctree.resolve(spec, proctree.snapshot(str(tmp_path)), str(tmp_path))
    assert (found, trusted) == (set(), set())
    rooted = TreeSpec(roots={500}, sessions={500})
    assert proctree.resolve(rooted, proctree.snapshot(str(tmp_path)), str(tmp_path)) == ({500, 501}, {500})


def test_members_never_include_the_daemon_itself_or_init(tmp_path: Path) -> None:
    me = os.getpid()
    fake_proc(tmp_path, 1, 0, 1)
    fake_proc(tmp_path, me, 1, 7)
    fake_proc(tmp_path, 9999999, me, 7)
    spec = TreeSpec(roots={7, 1}, sessions={7, 1})
    found = members(spec, proctree.snapshot(str(tmp_path)), str(tmp_path))
    assert found == {9999999}


# ----- ending real trees -----------------------------------------------------------------------------------


def test_kill_tree_ends_children_grandchildren_escapees_and_sigterm_ignorers(
    cleanup_token: list[str],
) -> None:
    token = unique_sleep()
    cleanup_token.append(token)
    spec = TreeSpec()
    script = (
        f"sleep {token} & "  # a child
        f"(sleep {token} & wait) & "  # a grandchild
        f"setsid sleep {token} >/dev/null 2>&1 & "  # its own session
        f"(setsid sh -c 'trap \"\" TERM HUP; sleep {token}' >/dev/null 2>&1 &) ; "  # double fork, no SIGTERM
        f"nohup sleep {token} >/dev/null 2>&1 & "
        "wait"
    )
    shell = subprocess.Popen(
        ["/bin/sh", "-c", script],
        env=spec.environment(dict(os.environ)),
        start_new_session=True,
    )
    spec.roots.add(shell.pid)
    spec.sessions.add(shell.pid)
    wait_until(lambda: len(processes_with(token)) >= 5, "the tree did not start")
    assert kill_tree(spec) >= 6
    shell.wait(timeout=GENEROUS_SECONDS)
    wait_until(lambda: not processes_with(token), "processes of the tree outlived kill_tree")


def test_kill_tree_leaves_other_trees_alone(cleanup_token: list[str]) -> None:
    token = unique_sleep()
    cleanup_token.append(token)
    mine, other = TreeSpec(), TreeSpec()
    started = [
        subprocess.Popen(
            ["/bin/sh", "-c", f"setsid sleep {token} >/dev/null 2>&1 & wait"],
            env=spec.environment(dict(os.environ)),
            start_new_session=True,
        )
        for spec in (mine, other)
    ]
    wait_until(lambda: len(processes_with(token)) >= 4, "the trees did not start")
    mine.sessions.add(started[0].pid)
    kill_tree(mine)
    started[0].wait(timeout=GENEROUS_SECONDS)
    wait_until(lambda: len(processes_with(token)) == 2, "the first tree did not end")
    assert started[1].poll() is None, "the other tree's shell was killed"


def test_deadline_reaper_ends_a_tree_at_its_deadline(cleanup_token: list[str]) -> None:
    token = unique_sleep()
    cleanup_token.append(token)
    spec = TreeSpec()
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f"setsid sleep {token} >/dev/null 2>&1 &"],
        env=spec.environment(dict(os.environ)),
        start_new_session=True,
    )
    shell.wait(timeout=GENEROUS_SECONDS)
    wait_until(lambda: len(processes_with(token)) == 1, "the background process did not start")
    reaper = DeadlineReaper()
    reaper.schedule(spec, time.monotonic() + 0.5)
    wait_until(lambda: not processes_with(token), "the reaper did not end the tree")
    wait_until(lambda: reaper.pending() == 0, "the reaper kept the entry")


def test_an_exited_shell_left_unreaped_keeps_its_session_and_is_reaped_after_the_kill(
    cleanup_token: list[str],
) -> None:
    token = unique_sleep()
    cleanup_token.append(token)
    spec = TreeSpec()
    # The background sleep stays in the shell's session and process group; its environment is scrubbed,
    # so only the session (held by the unreaped shell) names it.
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f"env -u {TREE_ENV} sleep {token} >/dev/null 2>&1 & exit 3"],
        env=spec.environment(dict(os.environ)),
        start_new_session=True,
    )
    wait_until(lambda: proctree.exit_status_unreaped(shell.pid) is not None, "the shell did not exit")
    assert proctree.exit_status_unreaped(shell.pid) == 3
    with open(f"/proc/{shell.pid}/stat") as stat:
        assert proctree.parse_stat(stat.read()).state == "Z", "the shell was reaped"
    wait_until(lambda: proctree.session_has_others(shell.pid), "the background process did not start")
    spec.roots.add(shell.pid)
    spec.sessions.add(shell.pid)
    spec.held.add(shell.pid)
    reaper = DeadlineReaper()
    reaper.schedule(spec, time.monotonic() + 0.2)
    wait_until(lambda: not processes_with(token), "the held session's process survived its deadline")
    wait_until(lambda: not os.path.exists(f"/proc/{shell.pid}"), "the held shell was not reaped")
    assert not spec.held


# ----- through the daemon ----------------------------------------------------------------------------------


def execute(client: httpx.Client, command: str, **fields: object) -> httpx.Response:
    return client.post("/process/execute", json={"command": command, **fields}, timeout=GENEROUS_SECONDS)


def test_exec_timeout_ends_processes_that_left_the_session(
    daemon_client: httpx.Client, cleanup_token: list[str]
) -> None:
    token = unique_sleep()
    cleanup_token.append(token)
    command = (
        f"setsid sleep {token} >/dev/null 2>&1 & "
        f"(setsid sh -c 'trap \"\" TERM; sleep {token}' >/dev/null 2>&1 &); "
        "sleep 60"
    )
    response = execute(daemon_client, command, timeout=2)
    assert response.status_code == 408, response.text
    wait_until(lambda: not processes_with(token), "a timed-out command's processes survived")


def test_exec_timeout_also_ends_what_a_returned_shell_left_behind(
    daemon_client: httpx.Client, cleanup_token: list[str]
) -> None:
    token = unique_sleep()
    cleanup_token.append(token)
    response = execute(daemon_client, f"setsid sleep {token} >/dev/null 2>&1 & echo started", timeout=2)
    assert response.json()["result"] == "started\n"
    wait_until(lambda: not processes_with(token), "background processes outlived the command's timeout")


def test_exec_without_timeout_keeps_background_processes(
    daemon_client: httpx.Client, cleanup_token: list[str]
) -> None:
    token = unique_sleep()
    cleanup_token.append(token)
    assert execute(daemon_client, f"setsid sleep {token} >/dev/null 2>&1 &").status_code == 200
    wait_until(lambda: len(processes_with(token)) == 1, "the background process did not start")
    # A later command with a timeout that expires must not touch it either.
    assert execute(daemon_client, "sleep 5", timeout=1).status_code == 408
    assert len(processes_with(token)) == 1


def test_exec_stdin_is_at_end_of_file_not_the_rest_of_the_script(daemon_client: httpx.Client) -> None:
    body = execute(daemon_client, "cat\necho after=$?\nread -r line; echo read=$?").json()
    assert body["result"] == "after=0\nread=1\n"


def test_sync_session_command_stdin_is_at_end_of_file(daemon_client: httpx.Client) -> None:
    assert daemon_client.post("/process/session", json={"sessionId": "stdin"}).status_code == 201
    response = daemon_client.post(
        "/process/session/stdin/exec", json={"command": "timeout 5 cat; echo rc=$?"}, timeout=GENEROUS_SECONDS
    )
    assert response.json()["output"] == "rc=0\n"


def test_delete_session_ends_its_processes_and_no_other_sessions(
    daemon_client: httpx.Client, cleanup_token: list[str]
) -> None:
    mine, theirs = unique_sleep(), unique_sleep()
    cleanup_token += [mine, theirs]
    for session_id, token in (("doomed", mine), ("bystander", theirs)):
        assert daemon_client.post("/process/session", json={"sessionId": session_id}).status_code == 201
        command = (
            f"setsid sleep {token} >/dev/null 2>&1 & "
            f"(trap '' TERM HUP; exec sleep {token}) >/dev/null 2>&1 & "
            f"(env -u {TREE_ENV} setsid sleep {token} >/dev/null 2>&1 &)"
        )
        response = daemon_client.post(f"/process/session/{session_id}/exec", json={"command": command})
        assert response.json()["exitCode"] == 0
    wait_until(lambda: len(processes_with(mine)) == 3 and len(processes_with(theirs)) == 3, "not started")
    assert daemon_client.delete("/process/session/doomed").status_code == 204
    wait_until(lambda: not processes_with(mine), "a deleted session's processes survived")
    assert len(processes_with(theirs)) == 3, "another session's processes were ended"
    assert daemon_client.delete("/process/session/bystander").status_code == 204
    wait_until(lambda: not processes_with(theirs), "the second session's processes survived")


def test_the_users_processes_go_before_the_daemon_when_memory_runs_out(daemon_client: httpx.Client) -> None:
    response = execute(daemon_client, "cat /proc/self/oom_score_adj; cat /proc/$$/oom_score_adj", timeout=10)
    assert response.json()["result"].split() == [str(proctree.USER_OOM_SCORE_ADJ)] * 2
    with open("/proc/self/oom_score_adj") as own:
        assert int(own.read()) < proctree.USER_OOM_SCORE_ADJ
