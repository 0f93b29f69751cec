"""Process toolbox end to end through the official SDK (daytona==0.226.1) against a real stack: sessions,
streamed session logs, PTYs (through proxy -> runner -> daemon WebSockets) and exec behaviour."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from daytona import (
    Daytona,
    DaytonaConflictError,
    DaytonaError,
    DaytonaNotFoundError,
    DaytonaProcessExecutionTimeoutError,
    PtySize,
    Sandbox,
    SessionExecuteRequest,
)
from daytona.handle.pty_handle import PtyHandle

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


@pytest.fixture(scope="module")
def sandbox(stack: StackThread) -> Iterator[Sandbox]:
    daytona = Daytona()
    created = daytona.create()
    try:
        yield created
    finally:
        daytona.delete(created)


def read_pty_until(handle: PtyHandle, needle: bytes, timeout: float = 20) -> bytes:
    received = bytearray()
    deadline = time.monotonic() + timeout
    while needle not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} not seen in {bytes(received[-2000:])!r}")
        handle.wait(on_data=received.extend, timeout=min(remaining, 1.0))
        assert handle.exit_code is None or needle in received, f"PTY exited early: {bytes(received)!r}"
    return bytes(received)


def test_sessions_through_the_sdk(sandbox: Sandbox) -> None:
    process = sandbox.process
    process.create_session("sdk-session")
    with pytest.raises(DaytonaConflictError):
        process.create_session("sdk-session")
    session = process.get_session("sdk-session")
    assert session.session_id == "sdk-session"
    assert session.commands == []
    assert "sdk-session" in {item.session_id for item in process.list_sessions()}

    first = process.execute_session_command(
        "sdk-session", SessionExecuteRequest(command="export MY_VAR=kept; cd /tmp")
    )
    assert first.exit_code == 0
    second = process.execute_session_command(
        "sdk-session", SessionExecuteRequest(command='echo "$MY_VAR $(pwd)"; echo oops >&2; false')
    )
    assert second.stdout == "kept /tmp\n"
    assert second.stderr == "oops\n"
    assert second.exit_code == 1
    assert second.additional_properties.get("termination") == {"reason": "exited", "signal": None}

    logs = process.get_session_command_logs("sdk-session", second.cmd_id)
    assert (logs.stdout, logs.stderr) == ("kept /tmp\n", "oops\n")
    command = process.get_session_command("sdk-session", second.cmd_id)
    assert (command.command, command.exit_code) == ('echo "$MY_VAR $(pwd)"; echo oops >&2; false', 1)
    assert [c.id for c in process.get_session("sdk-session").commands] == [first.cmd_id, second.cmd_id]

    process.delete_session("sdk-session")
    with pytest.raises(DaytonaNotFoundError):
        process.get_session("sdk-session")
    with pytest.raises(DaytonaNotFoundError):
        process.execute_session_command("sdk-session", SessionExecuteRequest(command="echo"))


def test_async_session_command_streams_logs_and_takes_input(sandbox: Sandbox) -> None:
    process = sandbox.process
    process.create_session("sdk-stream")
    try:
        command = "for i in 1 2 3; do echo out-$i; echo err-$i >&2; sleep 0.3; done"
        started = process.execute_session_command(
            "sdk-stream", SessionExecuteRequest(command=command, run_async=True)
        )
        assert started.exit_code is None
        stdout: list[str] = []
        stderr: list[str] = []
        asyncio.run(
            process.get_session_command_logs_async("sdk-stream", started.cmd_id, stdout.append, stderr.append)
        )
        assert "".join(stdout) == "out-1\nout-2\nout-3\n"
        assert "".join(stderr) == "err-1\nerr-2\nerr-3\n"
        assert process.get_session_command("sdk-stream", started.cmd_id).exit_code == 0

        reader = process.execute_session_command(
            "sdk-stream", SessionExecuteRequest(command='read -r name; echo "hi $name"', run_async=True)
        )
        process.send_session_command_input("sdk-stream", reader.cmd_id, "tidepool")
        wait_until(
            lambda: process.get_session_command("sdk-stream", reader.cmd_id).exit_code is not None,
            "the reading command never finished",
        )
        assert "hi tidepool" in (process.get_session_command_logs("sdk-stream", reader.cmd_id).stdout or "")
    finally:
        process.delete_session("sdk-stream")


def test_entrypoint_session(sandbox: Sandbox) -> None:
    assert sandbox.process.get_entrypoint_session().commands == []
    logs = sandbox.process.get_entrypoint_logs()
    assert (logs.output, logs.stdout, logs.stderr) == ("", "", "")


def test_pty_create_disconnect_resize_reconnect(sandbox: Sandbox) -> None:
    process = sandbox.process
    handle = process.create_pty_session("sdk-pty", pty_size=PtySize(rows=24, cols=80))
    assert handle.is_connected()
    handle.send_input('printf "pty-%s\\n" output\n')
    read_pty_until(handle, b"pty-output")
    handle.disconnect()

    assert "sdk-pty" in {info.id for info in process.list_pty_sessions()}
    info = process.get_pty_session_info("sdk-pty")
    assert info.active and (info.cols, info.rows) == (80, 24)
    resized = process.resize_pty_session("sdk-pty", PtySize(rows=30, cols=100))
    assert (resized.rows, resized.cols) == (30, 100)

    again = process.connect_pty_session("sdk-pty")
    again.send_input("stty size\n")
    read_pty_until(again, b"30 100")
    again.send_input('printf "pty-%s\\n" again\nexit\n')
    data = read_pty_until(again, b"pty-again")
    result = again.wait(timeout=20)
    assert result.exit_code == 0, (result, data)
    again.disconnect()
    with pytest.raises(DaytonaNotFoundError):
        process.get_pty_session_info("sdk-pty")


def test_pty_kill_and_duplicate(sandbox: Sandbox) -> None:
    process = sandbox.process
    handle = process.create_pty_session("sdk-pty-kill")
    try:
        with pytest.raises(DaytonaError):
            process.create_pty_session("sdk-pty-kill")  # 409 before the upgrade
        handle.kill()
        result = handle.wait(timeout=20)
        assert result.exit_code == 137
    finally:
        handle.disconnect()
    assert "sdk-pty-kill" not in {info.id for info in process.list_pty_sessions()}


def test_exec_timeout(sandbox: Sandbox) -> None:
    # The daemon's 408 PROCESS_EXECUTION_TIMEOUT, and the command's background child is killed with it.
    with pytest.raises(DaytonaProcessExecutionTimeoutError):
        sandbox.process.exec("sleep 300 & echo $! > sdk-timeout.pid; sleep 300", timeout=1)
    # Field 3 of /proc/<pid>/stat is the state: empty once the process is gone, Z until it is reaped.
    state = "awk '{print $3}' /proc/$(cat sdk-timeout.pid)/stat 2>/dev/null"
    gone = ("", "Z")
    wait_until(lambda: sandbox.process.exec(state).result.strip() in gone, "the exec's child outlived it")


def test_background_server_survives_the_exec(sandbox: Sandbox) -> None:
    launched = sandbox.process.exec("nohup python3 -m http.server 8000 &")
    assert launched.exit_code == 0
    probe = "curl -s -o /dev/null -w '%{http_code}' localhost:8000"
    wait_until(lambda: sandbox.process.exec(probe).result == "200", "the background server never answered")
    # Served requests log to the inherited (now daemon-drained) stderr: the server must keep running.
    assert sandbox.process.exec("curl -s localhost:8000 >/dev/null && echo ok").result == "ok\n"


def test_long_exec_does_not_block_others(sandbox: Sandbox) -> None:
    results: dict[str, object] = {}
    # The long exec runs until the test opens the gate, which it does only after the quick ones answered.
    sandbox.process.exec("rm -f long-running long-gate")
    long_command = "touch long-running; until [ -e long-gate ]; do sleep 0.05; done; echo slow"

    def long_exec() -> None:
        results["long"] = sandbox.process.exec(long_command, timeout=120).result

    thread = threading.Thread(target=long_exec)
    thread.start()
    try:
        wait_until(lambda: sandbox.process.exec("test -e long-running").exit_code == 0, "no long exec")
        for index in range(3):
            assert sandbox.process.exec(f"echo quick-{index}").result == f"quick-{index}\n"
        assert thread.is_alive() and "long" not in results
    finally:
        sandbox.process.exec("touch long-gate")
        thread.join(150)
    assert results["long"] == "slow\n"
