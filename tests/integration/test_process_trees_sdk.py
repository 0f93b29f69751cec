"""Process trees and stdin through the official SDK (daytona==0.226.1) against a real stack (issue #7 item 3,
issue #19 items 1 and 2): a timeout ends everything a command started, deleting a session or killing a PTY
ends everything it started (and nothing else), and every way to run a command has the documented stdin.

Processes are found from inside the sandbox by a unique `sleep` argument, read from `/proc` by a checker
whose own command line holds the argument only in two pieces."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest
from daytona import Daytona, DaytonaError, Sandbox, SessionExecuteRequest

from tests import polling
from tests.integration.stackthread import StackThread

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

GENEROUS_SECONDS = 60.0

# argv[1] + "." + argv[2] is the token; prints how many live processes have it in their command line.
_COUNT_SCRIPT = (
    "import os, sys\n"
    "token = (sys.argv[1] + '.' + sys.argv[2]).encode()\n"
    "count = 0\n"
    "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try:\n"
    "        cmdline = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
    "        state = open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[0]\n"
    "    except OSError:\n"
    "        continue\n"
    "    count += token in cmdline and state not in ('Z', 'X')\n"
    "print(count)\n"
)

# Prints how many `bash` processes other than the checker's own shell are alive (the fork bomb's).
_COUNT_SHELLS_SCRIPT = (
    "import os\n"
    "count = 0\n"
    "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try:\n"
    "        stat = open(f'/proc/{pid}/stat').read()\n"
    "    except OSError:\n"
    "        continue\n"
    "    name = stat.partition('(')[2].rpartition(')')[0]\n"
    "    state = stat.rpartition(')')[2].split()[0]\n"
    "    count += name == 'bash' and int(pid) != os.getppid() and state not in ('Z', 'X')\n"
    "print(count)\n"
)


@pytest.fixture(scope="module")
def sandbox(stack: StackThread) -> Iterator[Sandbox]:
    daytona = Daytona()
    created = daytona.create()
    try:
        yield created
    finally:
        daytona.delete(created)


def new_token() -> str:
    """A `sleep` argument (seconds) no other process uses."""
    return f"{600 + uuid.uuid4().int % 100000}.{uuid.uuid4().int % 1000:03d}"


def count_processes(sandbox: Sandbox, token: str) -> int:
    whole, fraction = token.split(".")
    response = sandbox.process.exec(f"python3 -c {_quote(_COUNT_SCRIPT)} {whole} {fraction}")
    assert response.exit_code == 0, response.result
    return int(response.result.strip())


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def wait_for(condition: Callable[[], bool], what: str, within: float = GENEROUS_SECONDS) -> None:
    polling.wait_until(condition, what, timeout=within, interval=0.5)


def escaping_processes(token: str) -> str:
    """Shell text starting five `sleep token` processes that try to outlive their command: a child, a
    grandchild, one in its own session, a double-forked one in its own session that ignores SIGTERM and
    SIGHUP, and a `nohup` one."""
    return (
        f"sleep {token} >/dev/null 2>&1 & "
        f"(sleep {token} & wait) >/dev/null 2>&1 & "
        f"setsid sleep {token} >/dev/null 2>&1 & "
        f"(setsid sh -c 'trap \"\" TERM HUP; exec sleep {token}' >/dev/null 2>&1 &); "
        f"nohup sleep {token} >/dev/null 2>&1 & "
    )


# ----- timeouts end the whole tree -------------------------------------------------------------------------


def test_exec_timeout_ends_the_whole_process_tree(sandbox: Sandbox) -> None:
    token = new_token()
    with pytest.raises(DaytonaError, match=r"(?i)timeout"):
        sandbox.process.exec(escaping_processes(token) + "sleep 120", timeout=3)
    wait_for(lambda: count_processes(sandbox, token) == 0, "processes of a timed-out exec survived")


def test_exec_timeout_ends_what_the_command_left_in_the_background(sandbox: Sandbox) -> None:
    token = new_token()
    response = sandbox.process.exec(escaping_processes(token) + "echo started", timeout=4)
    assert (response.exit_code, response.result) == (0, "started\n")
    wait_for(lambda: count_processes(sandbox, token) == 0, "background processes outlived the exec timeout")


def test_exec_without_timeout_keeps_its_background_processes(sandbox: Sandbox) -> None:
    token = new_token()
    sandbox.process.exec(f"setsid sleep {token} >/dev/null 2>&1 &")
    try:
        wait_for(lambda: count_processes(sandbox, token) == 1, "the background process did not start")
        with pytest.raises(DaytonaError, match=r"(?i)timeout"):
            sandbox.process.exec("sleep 30", timeout=1)  # another command's timeout: not this tree
        assert count_processes(sandbox, token) == 1
    finally:
        sandbox.process.exec(f"pkill -f 'sleep {token}' || true")


def test_code_run_timeout_ends_processes_it_started(sandbox: Sandbox) -> None:
    token = new_token()
    code = (
        "import subprocess, time\n"
        f"subprocess.Popen(['setsid', 'sleep', '{token}'])\n"
        f"subprocess.Popen(['sh', '-c', 'trap \"\" TERM; sleep {token}'], start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    try:
        response = sandbox.process.code_run(code, timeout=3)
    except Exception as error:  # this SDK call lets the toolbox client's own 408 exception through
        assert "timeout" in str(error).lower()
    else:
        assert response.exit_code != 0
    wait_for(lambda: count_processes(sandbox, token) == 0, "processes of a timed-out code run survived")


def test_fork_bomb_is_gone_after_the_exec_timeout(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        # The shell returns at once and leaves the bomb running in the background (or the call fails
        # while the bomb holds every pid of the sandbox): either way the bomb must end at the timeout.
        with contextlib.suppress(DaytonaError):
            sandbox.process.exec(":(){ :|:& };:", timeout=5)

        def bomb_gone() -> bool:
            try:
                response = sandbox.process.exec(f"python3 -c {_quote(_COUNT_SHELLS_SCRIPT)}", timeout=30)
            except DaytonaError:
                return False  # the toolbox cannot start anything while the bomb holds every pid
            return response.exit_code == 0 and response.result.strip() == "0"

        wait_for(bomb_gone, "the fork bomb outlived its exec timeout", within=120)
    finally:
        daytona.delete(sandbox)


# ----- sessions and PTYs end what they started -------------------------------------------------------------


def test_delete_session_ends_its_processes_and_nothing_of_another_session(sandbox: Sandbox) -> None:
    process = sandbox.process
    doomed, bystander = new_token(), new_token()
    process.create_session("tree-doomed")
    process.create_session("tree-bystander")
    try:
        for session_id, token in (("tree-doomed", doomed), ("tree-bystander", bystander)):
            command = escaping_processes(token) + f"(env -u TIDEPOOL_PROCESS_TREE setsid sleep {token} &)"
            result = process.execute_session_command(session_id, SessionExecuteRequest(command=command))
            assert result.exit_code == 0
        wait_for(lambda: count_processes(sandbox, doomed) == 6, "the first session's processes did not start")
        wait_for(lambda: count_processes(sandbox, bystander) == 6, "the other session's did not start")
        process.delete_session("tree-doomed")
        wait_for(lambda: count_processes(sandbox, doomed) == 0, "a deleted session's processes survived")
        assert count_processes(sandbox, bystander) == 6, "another session lost processes"
    finally:
        process.delete_session("tree-bystander")
    wait_for(lambda: count_processes(sandbox, bystander) == 0, "the second session's processes survived")


def test_delete_session_ends_the_issue_19_setsid_sleep(sandbox: Sandbox) -> None:
    process = sandbox.process
    process.create_session("tree-issue")
    token = new_token()
    request = SessionExecuteRequest(command=f"setsid sleep {token} >/dev/null 2>&1 &")
    assert process.execute_session_command("tree-issue", request).exit_code == 0
    wait_for(lambda: count_processes(sandbox, token) == 1, "the setsid sleep did not start")
    process.delete_session("tree-issue")
    wait_for(lambda: count_processes(sandbox, token) == 0, "the setsid sleep outlived delete_session")


def test_killing_a_pty_ends_its_background_nohup_child(sandbox: Sandbox) -> None:
    token = new_token()
    handle = sandbox.process.create_pty_session("tree-pty")
    try:
        handle.send_input(f"nohup sleep {token} >/dev/null 2>&1 &\nsetsid sleep {token} >/dev/null 2>&1 &\n")
        wait_for(lambda: count_processes(sandbox, token) == 2, "the PTY's background processes did not start")
        handle.kill()
        handle.wait(timeout=30)
    finally:
        handle.disconnect()
    wait_for(lambda: count_processes(sandbox, token) == 0, "processes of a killed PTY survived")


# ----- stdin: the same, documented behaviour everywhere (README, toolbox) ----------------------------------


def test_exec_stdin_is_at_end_of_file(sandbox: Sandbox) -> None:
    response = sandbox.process.exec("cat\necho cat=$?\nread -r line; echo read=$?")
    assert response.result == "cat=0\nread=1\n"


def test_sync_session_command_stdin_is_at_end_of_file(sandbox: Sandbox) -> None:
    process = sandbox.process
    process.create_session("stdin-sync")
    try:
        result = process.execute_session_command(
            "stdin-sync", SessionExecuteRequest(command="timeout 5 cat; echo rc=$?"), timeout=60
        )
        assert (result.stdout, result.exit_code) == ("rc=0\n", 0)
        bare = process.execute_session_command("stdin-sync", SessionExecuteRequest(command="cat"), timeout=60)
        assert (bare.output, bare.exit_code) == ("", 0)
    finally:
        process.delete_session("stdin-sync")


def test_async_session_command_keeps_receiving_input(sandbox: Sandbox) -> None:
    process = sandbox.process
    process.create_session("stdin-async")
    try:
        started = process.execute_session_command(
            "stdin-async", SessionExecuteRequest(command="head -n 2; echo rc=$?", run_async=True)
        )
        process.send_session_command_input("stdin-async", started.cmd_id, "first")
        process.send_session_command_input("stdin-async", started.cmd_id, "second")

        def finished() -> bool:
            return process.get_session_command("stdin-async", started.cmd_id).exit_code is not None

        wait_for(finished, "the async command did not finish after its input")
        logs = process.get_session_command_logs("stdin-async", started.cmd_id)
        assert (logs.stdout or "").endswith("first\nsecond\nrc=0\n"), logs.stdout
    finally:
        process.delete_session("stdin-async")


def test_code_run_stdin_is_at_end_of_file(sandbox: Sandbox) -> None:
    response = sandbox.process.code_run("import sys\nprint(repr(sys.stdin.read()))")
    assert (response.exit_code, response.result) == (0, "''\n")
