"""Issue #7 item 8 through the official SDK against a real stack: one request no longer wedges a sandbox's
toolbox, and a toolbox that stops answering is noticed, restarted and reported by the runner.

The daemon is wedged on purpose from the host (this test runs as the host's root): its serving worker, or
also its supervisor, gets SIGSTOP, found from the container's init process (`State.Pid` of the engine's
inspect). The runner's checks are tightened for the test stack (stackthread.py), never timed here: every
wait is for an observable outcome (an event, a state) with a generous deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from daytona import Daytona, DaytonaError, FileUpload, Sandbox

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

DEADLINE_SECONDS = 120.0


@pytest.fixture
def sandbox(stack: StackThread) -> Iterator[Sandbox]:
    daytona = Daytona()
    created = daytona.create()
    try:
        yield created
    finally:
        with contextlib.suppress(Exception):
            for pid in daemon_processes(stack, created.id):
                os.kill(pid, signal.SIGCONT)  # a stopped container would take the delete's full timeout
        daytona.delete(created)


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    return wait_until(condition, f"timed out waiting for {what}", timeout=DEADLINE_SECONDS, interval=0.5)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def daemon_processes(stack: StackThread, sandbox_id: str) -> tuple[int, int]:
    """Host pids of the sandbox's daemon supervisor (the child of the container's init running main.py)
    and of its serving worker (the supervisor's child named `tidepool-worker`)."""
    engine = urlsplit(stack.docker_host).path
    with httpx.Client(transport=httpx.HTTPTransport(uds=engine), base_url="http://engine") as client:
        init_pid = client.get(f"/containers/tidepool-{sandbox_id}/json").json()["State"]["Pid"]
    supervisor = next(
        pid
        for pid in children(init_pid)
        if process_name(pid) != "tidepool-worker" and any(part.endswith("/main.py") for part in cmdline(pid))
    )
    worker = next(pid for pid in children(supervisor) if process_name(pid) == "tidepool-worker")
    return supervisor, worker


def events_of(stack: StackThread, sandbox_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{stack.api_url}/sandbox/{sandbox_id}/events", headers={"Authorization": f"Bearer {stack.api_key}"}
    )
    assert response.status_code == 200, response.text
    return list(response.json())


def event_of_type(stack: StackThread, sandbox_id: str, event_type: str) -> dict[str, Any] | None:
    return next((event for event in events_of(stack, sandbox_id) if event["type"] == event_type), None)


def test_the_issue_call_answers_and_the_toolbox_keeps_working(sandbox: Sandbox) -> None:
    """The issue's exact call, over the issue's 41-byte file, froze the daemon for 35 minutes."""
    sandbox.fs.upload_files([FileUpload(b"a" * 40 + b"!", "catastrophic.txt")])
    assert sandbox.fs.find_files(".", "(a+)+$") == []  # plain text: no line contains `(a+)+$`
    response = sandbox.process.exec("echo ok")
    assert (response.exit_code, response.result.strip()) == (0, "ok")
    # Issue #19 item 4: regex metacharacters are just text.
    sandbox.fs.upload_files([FileUpload(b"price: $5.00 (approx)\n", "prices/list.txt")])
    matches = sandbox.fs.find_files("prices", "$5.00 (")
    assert [(m.file, m.line, m.content) for m in matches] == [("prices/list.txt", 1, "price: $5.00 (approx)")]


def test_a_wedged_daemon_is_restarted_and_the_restart_is_an_event(
    stack: StackThread, sandbox: Sandbox
) -> None:
    background = sandbox.process.exec("nohup sleep 600 >/dev/null 2>&1 & echo $!").result.strip()
    supervisor, worker = daemon_processes(stack, sandbox.id)
    os.kill(worker, signal.SIGSTOP)  # wedged: it holds its connections and answers nothing

    restarted = wait_for(
        lambda: event_of_type(stack, sandbox.id, "sandbox.daemon.restarted"), "the restart event"
    )
    assert "did not answer GET /version" in restarted["reason"], restarted
    response = sandbox.process.exec("echo ok")
    assert (response.exit_code, response.result.strip()) == (0, "ok")
    assert sandbox.process.exec(f"kill -0 {background}").exit_code == 0, "the user's process survived"
    new_supervisor, new_worker = daemon_processes(stack, sandbox.id)
    assert new_supervisor == supervisor and new_worker != worker
    assert not Path(f"/proc/{worker}").exists(), "the wedged worker was killed"
    sandbox.refresh_data()
    assert sandbox.state == "started"


def test_a_daemon_that_cannot_be_restarted_is_a_recoverable_error(
    stack: StackThread, sandbox: Sandbox
) -> None:
    supervisor, worker = daemon_processes(stack, sandbox.id)
    # The supervisor too: the runner's restart signal then reaches no one who can act on it.
    os.kill(supervisor, signal.SIGSTOP)
    os.kill(worker, signal.SIGSTOP)

    def errored() -> bool:
        sandbox.refresh_data()
        return sandbox.state == "error"

    wait_for(errored, "the sandbox to report error")
    assert sandbox.recoverable is True
    assert sandbox.error_reason and "stop and start the sandbox" in sandbox.error_reason
    failed = event_of_type(stack, sandbox.id, "sandbox.daemon.restart_failed")
    assert failed is not None and "still did not answer" in failed["reason"]
    state_changes = [
        event for event in events_of(stack, sandbox.id) if event["type"] == "sandbox.state.updated"
    ]
    assert state_changes[0]["newState"] == "error" and state_changes[0]["recoverable"] is True

    # The recovery the reason names: stop, then start.
    sandbox.stop(timeout=120)
    sandbox.start(timeout=120)
    assert sandbox.state == "started" and sandbox.recoverable is False
    response = sandbox.process.exec("echo ok")
    assert (response.exit_code, response.result.strip()) == (0, "ok")


def test_a_replaced_toolbox_socket_is_a_recoverable_error(stack: StackThread, sandbox: Sandbox) -> None:
    """The sandbox's own root swaps its toolbox socket for a link and stops the daemon: the toolbox is
    unusable (new connections are refused), so the runner's checks fail, the restart cannot help, and the
    sandbox reports `error` (recoverable) with events saying why, instead of staying `started` in silence."""
    swap = "sudo sh -c 'cd /run/tidepool && mv toolbox.sock real.sock && ln -s real.sock toolbox.sock'"
    response = sandbox.process.exec(swap)
    assert response.exit_code == 0, response.result
    # And stops the daemon's worker (as the security tester did), so the runner's pooled connection,
    # verified before the swap, answers no longer either. The restart replaces the worker, not the link.
    _supervisor, worker = daemon_processes(stack, sandbox.id)
    os.kill(worker, signal.SIGSTOP)

    def errored() -> bool:
        sandbox.refresh_data()
        return sandbox.state == "error"

    wait_for(errored, "the sandbox to report error")
    assert sandbox.recoverable is True
    found = "the toolbox socket failed the runner's checks (/run/tidepool/toolbox.sock is not a socket)"
    assert sandbox.error_reason and found in sandbox.error_reason
    assert "stop and start the sandbox" in sandbox.error_reason
    failed = event_of_type(stack, sandbox.id, "sandbox.daemon.restart_failed")
    assert failed is not None and found in failed["reason"], failed
    assert str(stack.data_dir) not in failed["reason"], "no host path in the tenant's events"

    # The recovery the reason names: the start removes whatever is at the socket's path.
    sandbox.stop(timeout=120)
    sandbox.start(timeout=120)
    assert sandbox.state == "started" and sandbox.recoverable is False
    response = sandbox.process.exec("echo ok")
    assert (response.exit_code, response.result.strip()) == (0, "ok")


def test_recover_brings_a_recoverable_error_back(stack: StackThread, sandbox: Sandbox) -> None:
    """`sandbox.recover()` (behaviour spec "Recover"): only from a recoverable error; the container restarts
    with its files, and the sandbox answers again."""
    sandbox.fs.upload_file(b"kept", "recover-marker.txt")
    with pytest.raises(DaytonaError) as refused:
        sandbox.recover()  # started: nothing to recover
    assert refused.value.status_code == 400
    supervisor, worker = daemon_processes(stack, sandbox.id)
    os.kill(supervisor, signal.SIGSTOP)
    os.kill(worker, signal.SIGSTOP)

    def errored() -> bool:
        sandbox.refresh_data()
        return sandbox.state == "error"

    wait_for(errored, "the sandbox to report error")
    assert sandbox.recoverable is True
    sandbox.recover(timeout=120)
    assert sandbox.state == "started" and sandbox.recoverable is False and not sandbox.error_reason
    assert sandbox.process.exec("cat recover-marker.txt").result == "kept"
