"""`/process/pty…` against the real daemon over WebSockets: control messages, I/O, controlling terminal,
disconnect/reconnect with backlog, resize, exit codes in the close frame, kill, errors."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, unix_connect

from tests.polling import wait_until

EXIT_CONTROL = "X-Daytona-Pty-Exit-Control"


def open_pty(socket_path: Path, path: str, subprotocols: list[str] | None = None) -> ClientConnection:
    ws = unix_connect(
        str(socket_path),
        f"ws://daemon{path}",
        subprotocols=subprotocols or [EXIT_CONTROL],  # type: ignore[arg-type]
        legacy=True,  # returned directly, closed by each test
    )
    first = ws.recv(timeout=10)
    assert json.loads(first) == {"type": "control", "status": "connected"}
    return ws


def read_until(ws: ClientConnection, needle: bytes, timeout: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} not seen in {data[-2000:]!r}")
        try:
            message = ws.recv(timeout=remaining)
        except TimeoutError:
            continue
        data += message if isinstance(message, bytes) else message.encode()
    return data


def read_to_close(ws: ClientConnection, timeout: float = 10) -> tuple[list[str | bytes], int, str]:
    messages: list[str | bytes] = []
    try:
        while True:
            messages.append(ws.recv(timeout=timeout))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None
        return messages, closed.rcvd.code, closed.rcvd.reason


def test_create_connect_io_and_clean_exit(daemon_socket: Path, daemon_client: httpx.Client) -> None:
    ws = open_pty(daemon_socket, "/process/pty/create-connect?id=p1&cols=120&rows=40")
    assert ws.subprotocol == EXIT_CONTROL
    ws.send(b'printf "pty-%s\\n" output\n')
    read_until(ws, b"pty-output")
    ws.send(b"stty size; tty\n")
    data = read_until(ws, b"/dev/pts/")
    assert b"40 120" in data
    info = daemon_client.get("/process/pty/p1").json()
    assert info["active"] is True and info["cols"] == 120 and info["rows"] == 40
    assert info["lazyStart"] is False and isinstance(info["createdAt"], str)
    ws.send(b"exit\n")
    messages, code, reason = read_to_close(ws)
    controls = [json.loads(m) for m in messages if isinstance(m, str)]
    assert controls[-1]["status"] == "exited" and controls[-1]["exitCode"] == 0
    assert controls[-1]["termination"] == {"reason": "exited", "signal": None}
    assert code == 1000
    assert json.loads(reason) == {"exitCode": 0}
    ws.close()
    # Upstream removes a session once its process exited.
    assert daemon_client.get("/process/pty/p1").status_code == 404


def test_nonzero_exit_closes_1011_with_the_code(daemon_socket: Path) -> None:
    ws = open_pty(daemon_socket, "/process/pty/create-connect?id=p2")
    ws.send(b"exit 3\n")
    messages, code, reason = read_to_close(ws)
    assert code == 1011
    assert json.loads(reason) == {"exitCode": 3}
    assert {"type": "control", "status": "exited", "exitCode": 3}.items() <= json.loads(
        [m for m in messages if isinstance(m, str)][-1]
    ).items()


def test_without_exit_control_no_exited_message(daemon_socket: Path) -> None:
    ws = open_pty(daemon_socket, "/process/pty/create-connect?id=p3", subprotocols=["something-else"])
    assert ws.subprotocol is None
    ws.send("exit 0\n")  # text frames are input too
    messages, code, _ = read_to_close(ws)
    assert code == 1000
    assert not any(isinstance(m, str) and "exited" in m for m in messages)


def test_envs_subprotocol_and_cwd(daemon_socket: Path, tmp_path: Path) -> None:
    envs = base64.urlsafe_b64encode(json.dumps({"PTY_VAR": "from-envs"}).encode()).rstrip(b"=").decode()
    ws = open_pty(
        daemon_socket,
        f"/process/pty/create-connect?id=p4&cwd={tmp_path}",
        subprotocols=[EXIT_CONTROL, f"X-Daytona-Pty-Envs~{envs}"],
    )
    assert ws.subprotocol == EXIT_CONTROL  # never the envs token
    ws.send(b'echo "v=$PTY_VAR"; pwd\n')
    data = read_until(ws, str(tmp_path).encode() + b"\r\n")
    assert b"v=from-envs" in data
    ws.close()


def test_ctrl_c_interrupts_the_foreground_job(daemon_socket: Path) -> None:
    ws = open_pty(daemon_socket, "/process/pty/create-connect?id=p5")
    # The foreground job says it runs (split, so the echoed command line does not match), then sleeps long
    # enough that only the interrupt ends it inside read_until's deadline.
    ws.send(b"sh -c 'printf \"fg-%s\\n\" ready; exec sleep 300'\n")
    read_until(ws, b"fg-ready")
    ws.send(b"\x03")  # SIGINT reaches `sleep` (the foreground job) through the controlling terminal
    ws.send(b'echo "after-$?"\n')
    read_until(ws, b"after-130", timeout=60)
    ws.close()


def test_disconnect_keeps_the_pty_and_reconnect_sees_backlog(
    daemon_socket: Path, daemon_client: httpx.Client, tmp_path: Path
) -> None:
    gate, printed = tmp_path / "gate", tmp_path / "printed"
    ws = open_pty(daemon_socket, "/process/pty/create-connect?id=p6")
    # Split so the terminal's echo of the command line does not contain the needle.
    command = f'until [ -e {gate} ]; do sleep 0.05; done; printf "printed-%s\\n" while-away; touch {printed}'
    ws.send(command.encode() + b"\n")
    ws.close()
    gate.touch()
    wait_until(printed.exists, "the PTY's shell stopped running once its client left")
    listed = daemon_client.get("/process/pty").json()["sessions"]
    assert [session["id"] for session in listed] == ["p6"]
    assert listed[0]["active"] is True
    resized = daemon_client.post("/process/pty/p6/resize", json={"cols": 100, "rows": 30}).json()
    assert (resized["rows"], resized["cols"]) == (30, 100)
    again = open_pty(daemon_socket, "/process/pty/p6/connect")
    read_until(again, b"printed-while-away")
    again.send(b"stty size\n")
    read_until(again, b"30 100")
    again.send(b'printf "pty-%s\\n" output\n')
    read_until(again, b"pty-output")
    again.send(b"exit\n")
    _, code, _ = read_to_close(again)
    assert code == 1000


def test_two_clients_share_output(daemon_socket: Path) -> None:
    first = open_pty(daemon_socket, "/process/pty/create-connect?id=p7")
    second = open_pty(daemon_socket, "/process/pty/p7/connect")
    first.send(b"echo shared-$((20+22))\n")
    read_until(first, b"shared-42")
    read_until(second, b"shared-42")
    first.close()
    second.close()


def test_kill_removes_the_session_and_closes_clients(
    daemon_socket: Path, daemon_client: httpx.Client
) -> None:
    ws = open_pty(daemon_socket, "/process/pty/create-connect?id=p8")
    response = daemon_client.delete("/process/pty/p8")
    assert response.status_code == 200
    assert response.json() == {}
    messages, code, reason = read_to_close(ws)
    assert code == 1011
    assert json.loads(reason) == {"exitCode": 137}
    exited = json.loads([m for m in messages if isinstance(m, str)][-1])
    assert exited["termination"] == {"reason": "signal", "signal": 9}
    assert daemon_client.get("/process/pty/p8").status_code == 404
    assert daemon_client.delete("/process/pty/p8").status_code == 404


def test_post_create_lazy_start_then_connect(daemon_socket: Path, daemon_client: httpx.Client) -> None:
    response = daemon_client.post(
        "/process/pty",
        json={"id": "lazy", "envs": {"LAZY": "yes"}, "cols": 90, "rows": 20, "lazyStart": True},
    )
    assert response.status_code == 201
    assert response.json() == {"sessionId": "lazy"}
    info = daemon_client.get("/process/pty/lazy").json()
    assert info["active"] is False and info["lazyStart"] is True and info["envs"] == {"LAZY": "yes"}
    ws = open_pty(daemon_socket, "/process/pty/lazy/connect")
    assert daemon_client.get("/process/pty/lazy").json()["active"] is True
    ws.send(b'echo "lazy=$LAZY"\n')
    read_until(ws, b"lazy=yes")
    ws.send(b"exit\n")
    read_to_close(ws)


def test_errors_before_the_upgrade(daemon_socket: Path, daemon_client: httpx.Client) -> None:
    open_pty(daemon_socket, "/process/pty/create-connect?id=dup").close()
    cases = {
        "/process/pty/create-connect?id=dup": 409,
        "/process/pty/create-connect?cols=80": 400,
        "/process/pty/create-connect?id=x&cols=0": 400,
        "/process/pty/create-connect?id=x&rows=abc": 400,
        "/process/pty/create-connect?id=x&cwd=/definitely/missing": 400,
        "/process/pty/missing/connect": 404,
    }
    for path, status in cases.items():
        with pytest.raises(InvalidStatus) as rejected:
            unix_connect(str(daemon_socket), f"ws://daemon{path}", subprotocols=[EXIT_CONTROL])  # type: ignore[list-item]
        assert rejected.value.response.status_code == status, path
    bad_envs = "X-Daytona-Pty-Envs~!!notbase64"
    with pytest.raises(InvalidStatus) as rejected:
        unix_connect(
            str(daemon_socket),
            "ws://daemon/process/pty/create-connect?id=envs",
            subprotocols=[EXIT_CONTROL, bad_envs],  # type: ignore[list-item]
        )
    assert rejected.value.response.status_code == 400
    assert "x" not in {s["id"] for s in daemon_client.get("/process/pty").json()["sessions"]}
    missing = daemon_client.get("/process/pty/missing")
    assert missing.status_code == 404 and missing.json()["code"] == "PROCESS_NOT_FOUND"
    assert daemon_client.post("/process/pty/dup/resize", json={"cols": 0, "rows": 10}).status_code == 400
    assert daemon_client.post("/process/pty/missing/resize", json={"cols": 10, "rows": 10}).status_code == 404
    assert daemon_client.post("/process/pty", json={"id": "dup"}).status_code == 409


def test_connected_message_travels_with_the_101(daemon_socket: Path) -> None:
    """The SDK's PtyHandle.wait_for_connection gives up (queue.Empty) if `connected` is not there ~100 ms
    after its handshake returns, so the daemon sends it in the same write as the 101 response."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    with sock:
        sock.connect(str(daemon_socket))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                "GET /process/pty/create-connect?id=greet HTTP/1.1\r\nHost: d\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {EXIT_CONTROL}\r\n\r\n"
            ).encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        # The read that completed the 101 response already carries the greeting frame.
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert f"Sec-WebSocket-Protocol: {EXIT_CONTROL}".encode() in head
        greeting = b'{"type":"control","status":"connected"}'
        assert rest[:2] == bytes([0x81, len(greeting)])  # unmasked, final text frame
        assert rest[2 : 2 + len(greeting)] == greeting
