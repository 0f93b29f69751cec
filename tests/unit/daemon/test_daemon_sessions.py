"""`/process/session…` against the real daemon: persistent shell state, sync/async execs, logs (plain and
streamed over WebSocket, with offset replay), input, deletion, termination reasons."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import unix_connect

from tests.polling import process_alive, wait_until, wait_until_dead

STDOUT = b"\x01\x01\x01"
STDERR = b"\x02\x02\x02"


def create(client: httpx.Client, session_id: str) -> httpx.Response:
    return client.post("/process/session", json={"sessionId": session_id})


def run(client: httpx.Client, session_id: str, command: str, **fields: Any) -> httpx.Response:
    return client.post(f"/process/session/{session_id}/exec", json={"command": command, **fields})


def wait_for_exit(client: httpx.Client, session_id: str, command_id: str, timeout: float = 30) -> dict:
    def finished() -> dict | None:
        body = client.get(f"/process/session/{session_id}/command/{command_id}").json()
        return body if body.get("exitCode") is not None else None

    return wait_until(finished, f"command {command_id} did not finish", timeout=timeout)


def demux(data: bytes) -> tuple[bytes, bytes]:
    """Split a marked log stream the way the SDK does."""
    out, err = bytearray(), bytearray()
    current = out
    position = 0
    while position < len(data):
        candidates = [i for i in (data.find(STDOUT, position), data.find(STDERR, position)) if i != -1]
        end = min(candidates) if candidates else len(data)
        current += data[position:end]
        if end == len(data):
            break
        current = out if data[end : end + 3] == STDOUT else err
        position = end + 3
    return bytes(out), bytes(err)


def follow_logs(socket_path: Path, session_id: str, command_id: str, query: str = "follow=true") -> tuple:
    """All frames of a log WebSocket, and the close code."""
    uri = f"ws://daemon/process/session/{session_id}/command/{command_id}/logs?{query}"
    frames: list[bytes] = []
    with unix_connect(str(socket_path), uri) as ws:
        try:
            while True:
                message = ws.recv(timeout=15)
                frames.append(message if isinstance(message, bytes) else message.encode())
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return b"".join(frames), closed.rcvd.code


def test_state_persists_across_execs(daemon_client: httpx.Client, tmp_path: Path) -> None:
    assert create(daemon_client, "s1").status_code == 201
    assert (
        run(daemon_client, "s1", "export MY_VAR=persisted; my_fn() { echo fn-$1; }").json()["exitCode"] == 0
    )
    assert run(daemon_client, "s1", f"cd {tmp_path}").status_code == 200
    body = run(daemon_client, "s1", 'echo "$MY_VAR"; pwd; my_fn ok').json()
    assert body["stdout"] == f"persisted\n{tmp_path}\nfn-ok\n"
    assert body["exitCode"] == 0


def test_sync_exec_splits_stdout_and_stderr(daemon_client: httpx.Client) -> None:
    create(daemon_client, "split")
    response = run(daemon_client, "split", "echo out; echo err >&2; exit_code() { return 3; }; exit_code")
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"cmdId", "output", "stdout", "stderr", "exitCode"}
    assert body["stdout"] == "out\n"
    assert body["stderr"] == "err\n"
    assert sorted(body["output"].splitlines()) == ["err", "out"]
    assert "\x01" not in body["output"] and "\x02" not in body["output"]
    assert body["exitCode"] == 3
    assert body["termination"] == {"reason": "exited", "signal": None}


def test_multiline_heredoc_and_syntax_error_do_not_break_the_session(daemon_client: httpx.Client) -> None:
    create(daemon_client, "robust")
    body = run(daemon_client, "robust", "cat <<'EOF'\nline one\n{ not closed\nEOF").json()
    assert body["stdout"] == "line one\n{ not closed\n"
    broken = run(daemon_client, "robust", "if then fi (").json()
    assert broken["exitCode"] != 0
    assert run(daemon_client, "robust", "echo still-alive").json()["stdout"] == "still-alive\n"


def test_async_exec_command_and_logs(daemon_client: httpx.Client) -> None:
    create(daemon_client, "async")
    response = run(daemon_client, "async", "echo begin; sleep 0.5; echo end >&2; exit 4", runAsync=True)
    assert response.status_code == 202
    command_id = response.json()["cmdId"]
    running = daemon_client.get(f"/process/session/async/command/{command_id}").json()
    assert running["id"] == command_id
    assert running["command"].startswith("echo begin")
    assert running.get("exitCode") is None
    finished = wait_for_exit(daemon_client, "async", command_id)
    assert finished["exitCode"] == 4
    assert finished["termination"] == {"reason": "exited", "signal": None}
    logs = daemon_client.get(f"/process/session/async/command/{command_id}/logs").json()
    assert logs == {"output": "begin\nend\n", "stdout": "begin\n", "stderr": "end\n"}
    session = daemon_client.get("/process/session/async").json()
    assert session["sessionId"] == "async"
    assert [command["id"] for command in session["commands"]] == [command_id]
    assert session["commands"][0]["exitCode"] == 4


def test_legacy_async_field_is_accepted(daemon_client: httpx.Client) -> None:
    create(daemon_client, "legacy")
    assert run(daemon_client, "legacy", "sleep 0.2", **{"async": True}).status_code == 202


def test_streamed_logs_arrive_while_running_and_close_1000(
    daemon_client: httpx.Client, daemon_socket: Path, work_dir: Path
) -> None:
    create(daemon_client, "stream")
    # The command blocks after its first lines until the test opens the gate: what arrives before that
    # was streamed while it ran.
    gate = work_dir / "gate"
    wait = f"until [ -e {gate} ]; do sleep 0.05; done"
    command = f"for i in 1 2 3; do echo out-$i; echo err-$i >&2; {wait}; done"
    command_id = run(daemon_client, "stream", command, runAsync=True).json()["cmdId"]
    uri = f"ws://daemon/process/session/stream/command/{command_id}/logs?follow=true"
    data = b""
    with unix_connect(str(daemon_socket), uri) as ws:
        while b"err-1" not in data:
            data += ws.recv(timeout=15)  # type: ignore[operator]
        assert b"out-2" not in data
        gate.touch()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                data += ws.recv(timeout=15)  # type: ignore[operator]
    assert closed.value.rcvd is not None
    code = closed.value.rcvd.code
    assert code == 1000
    stdout, stderr = demux(data)
    assert stdout == b"out-1\nout-2\nout-3\n"
    assert stderr == b"err-1\nerr-2\nerr-3\n"
    # A finished command replays the whole log and closes at once.
    replay, replay_code = follow_logs(daemon_socket, "stream", command_id)
    assert (replay, replay_code) == (data, 1000)


def test_reconnect_with_offset_loses_and_repeats_nothing(
    daemon_client: httpx.Client, daemon_socket: Path
) -> None:
    create(daemon_client, "resume")
    command = "for i in $(seq 1 8); do echo line-$i; sleep 0.1; done"
    command_id = run(daemon_client, "resume", command, runAsync=True).json()["cmdId"]
    uri = f"ws://daemon/process/session/resume/command/{command_id}/logs?follow=true"
    received = b""
    with unix_connect(str(daemon_socket), uri) as ws:
        while b"line-3" not in received:
            received += ws.recv(timeout=10)  # type: ignore[operator]
    # Disconnected mid-stream; pick up exactly where we stopped.
    rest, code = follow_logs(daemon_socket, "resume", command_id, f"follow=true&offset={len(received)}")
    assert code == 1000
    stdout, _ = demux(received + rest)
    assert stdout == b"".join(b"line-%d\n" % index for index in range(1, 9))


def test_send_input_to_running_command(daemon_client: httpx.Client) -> None:
    create(daemon_client, "input")
    command_id = run(daemon_client, "input", 'read -r name; echo "hello $name"', runAsync=True).json()[
        "cmdId"
    ]
    response = daemon_client.post(
        f"/process/session/input/command/{command_id}/input", json={"data": "world"}
    )
    assert response.status_code == 204
    assert wait_for_exit(daemon_client, "input", command_id)["exitCode"] == 0
    logs = daemon_client.get(f"/process/session/input/command/{command_id}/logs").json()
    assert logs["stdout"] == "world\nhello world\n"  # the input is echoed like upstream
    # The command is over: more input is 410 COMMAND_ALREADY_COMPLETED.
    gone = daemon_client.post(f"/process/session/input/command/{command_id}/input", json={"data": "x"})
    assert gone.status_code == 410
    assert gone.json()["code"] == "COMMAND_ALREADY_COMPLETED"


def test_suppressed_input_echo(daemon_client: httpx.Client) -> None:
    create(daemon_client, "quiet")
    command_id = run(
        daemon_client, "quiet", "read -r secret; echo got-${#secret}", runAsync=True, suppressInputEcho=True
    ).json()["cmdId"]
    daemon_client.post(f"/process/session/quiet/command/{command_id}/input", json={"data": "hunter2\n"})
    wait_for_exit(daemon_client, "quiet", command_id)
    assert (
        daemon_client.get(f"/process/session/quiet/command/{command_id}/logs").json()["stdout"] == "got-7\n"
    )


def test_background_job_does_not_hold_up_the_command(daemon_client: httpx.Client) -> None:
    create(daemon_client, "bg")
    body = run(daemon_client, "bg", "sleep 300 &\necho $!").json()
    assert body["exitCode"] == 0
    # The command answered while its background job still runs: it did not wait for it.
    child = int(body["stdout"])
    try:
        assert process_alive(child)
    finally:
        os.kill(child, signal.SIGKILL)
    # The session still works while the background job holds its old pipes.
    assert run(daemon_client, "bg", "echo next").json()["stdout"] == "next\n"


def test_exit_ends_the_shell_and_the_next_exec_gets_a_fresh_one(daemon_client: httpx.Client) -> None:
    create(daemon_client, "exit")
    run(daemon_client, "exit", "export GONE=1")
    body = run(daemon_client, "exit", "exit 7").json()
    assert body["exitCode"] == 7
    after = run(daemon_client, "exit", 'echo "gone=${GONE:-unset}"').json()
    assert after["stdout"] == "gone=unset\n"


def test_shell_killed_by_signal_is_reported(daemon_client: httpx.Client) -> None:
    create(daemon_client, "killed")
    body = run(daemon_client, "killed", "kill -9 $$").json()
    assert body["exitCode"] == 137
    assert body["termination"] == {"reason": "signal", "signal": 9}


def test_list_get_delete_and_errors(daemon_client: httpx.Client) -> None:
    assert create(daemon_client, "a").status_code == 201
    assert create(daemon_client, "b").status_code == 201
    duplicate = create(daemon_client, "a")
    assert duplicate.status_code == 409
    assert duplicate.json()["message"]
    listed = {session["sessionId"] for session in daemon_client.get("/process/session").json()}
    assert listed == {"a", "b"}
    assert daemon_client.get("/process/session/b").json() == {"sessionId": "b", "commands": []}
    assert daemon_client.delete("/process/session/b").status_code == 204
    missing = daemon_client.get("/process/session/b")
    assert missing.status_code == 404
    assert missing.json()["code"] == "PROCESS_NOT_FOUND"
    assert missing.json()["source"] == "DAYTONA_DAEMON"
    assert run(daemon_client, "b", "echo").status_code == 404
    assert daemon_client.delete("/process/session/b").status_code == 404
    assert daemon_client.get("/process/session/a/command/nope").status_code == 404
    assert daemon_client.get("/process/session/a/command/nope/logs").status_code == 404
    assert create(daemon_client, "").status_code == 400
    assert run(daemon_client, "a", "  ").status_code == 400


def test_delete_kills_running_commands_and_background_jobs(
    daemon_client: httpx.Client, work_dir: Path
) -> None:
    create(daemon_client, "doomed")
    # Each records its pid, then would outlive any deadline of this test.
    run(daemon_client, "doomed", f"sleep 300 & echo $! > {work_dir}/bg.pid")
    run(daemon_client, "doomed", f"sleep 300 & echo $! > {work_dir}/bg-of-dead-shell.pid; exit 0")
    fg = f"sh -c 'echo $$ > {work_dir}/fg.tmp && mv {work_dir}/fg.tmp {work_dir}/fg.pid && exec sleep 300'"
    command_id = run(daemon_client, "doomed", fg, runAsync=True).json()["cmdId"]
    assert command_id
    wait_until((work_dir / "fg.pid").exists, "the async command never started")
    pids = [int((work_dir / f"{name}.pid").read_text()) for name in ("bg", "bg-of-dead-shell", "fg")]
    assert all(process_alive(pid) for pid in pids)
    assert daemon_client.delete("/process/session/doomed").status_code == 204
    wait_until_dead(pids, "the deleted session's processes")
    assert create(daemon_client, "doomed").status_code == 201  # the id is free again


def test_follow_on_unknown_command_is_404_before_upgrade(
    daemon_socket: Path, daemon_client: httpx.Client
) -> None:
    create(daemon_client, "ws404")
    with pytest.raises(InvalidStatus) as rejected:
        unix_connect(str(daemon_socket), "ws://daemon/process/session/ws404/command/none/logs?follow=true")
    assert rejected.value.response.status_code == 404


def test_entrypoint_session_and_logs(daemon_client: httpx.Client, daemon_socket: Path) -> None:
    assert daemon_client.get("/process/session/entrypoint").json() == {
        "sessionId": "entrypoint",
        "commands": [],
    }
    assert daemon_client.get("/process/session/entrypoint/logs").json() == {
        "output": "",
        "stdout": "",
        "stderr": "",
    }
    with unix_connect(str(daemon_socket), "ws://daemon/process/session/entrypoint/logs?follow=true") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_sessions_inherit_the_effective_environment(
    daemon_client: httpx.Client, container_env_marker: tuple[str, str]
) -> None:
    name, value = container_env_marker
    create(daemon_client, "env")
    assert run(daemon_client, "env", f'echo "${name}"').json()["stdout"] == f"{value}\n"


def test_oom_kill_is_detected_from_the_cgroup_counter(
    socket_dir: Path, launch_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake cgroup events file: the command bumps the counter and then dies of SIGKILL, as in a real OOM.
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    monkeypatch.setenv("TIDEPOOL_DAEMON_OOM_EVENTS_FILE", str(events))
    with launch_daemon(socket_dir / "oom.sock") as socket_path:
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://daemon", timeout=30) as client:
            bump = f"printf 'oom 1\\noom_kill 1\\n' > {events}; kill -9 $$"
            executed = client.post("/process/execute", json={"command": bump}).json()
            assert executed["termination"] == {"reason": "oom_killed", "signal": 9}
            assert executed["exitCode"] == 137
            plain_kill = client.post("/process/execute", json={"command": "kill -9 $$"}).json()
            assert plain_kill["termination"] == {"reason": "signal", "signal": 9}
            create(client, "oom")
            bump = f"printf 'oom 2\\noom_kill 2\\n' > {events}; sh -c 'kill -9 $$'"
            body = run(client, "oom", bump).json()
            assert body["exitCode"] == 137
            assert body["termination"] == {"reason": "oom_killed", "signal": 9}
