"""Info endpoints and HTTP-level behaviour of the toolbox daemon (errors, keep-alive, framing)."""

from __future__ import annotations

import json
import socket
import stat
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx


def test_version(daemon_client: httpx.Client) -> None:
    response = daemon_client.get("/version")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"version": "0.1.0"}


def test_a_traced_request_gets_its_handling_time_back(daemon_client: httpx.Client) -> None:
    """With `traceparent` the daemon reports `start=<unix ns>;end=<unix ns>` (the runner makes it a span)."""
    assert "x-tidepool-daemon-span" not in daemon_client.get("/version").headers
    before = time.time_ns()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = daemon_client.post(
        "/process/execute", json={"command": "sleep 0.2"}, headers={"traceparent": traceparent}
    )
    after = time.time_ns()
    assert response.status_code == 200
    fields = dict(part.split("=") for part in response.headers["x-tidepool-daemon-span"].split(";"))
    start, end = int(fields["start"]), int(fields["end"])
    assert before <= start <= end <= after
    assert end - start >= 200_000_000  # it covers the command's run


def test_user_home_dir_comes_from_home_env(daemon_client: httpx.Client, tmp_path: Path) -> None:
    response = daemon_client.get("/user-home-dir")
    assert response.status_code == 200
    assert response.json() == {"dir": str(tmp_path / "home")}


def test_work_dir_is_daemon_cwd(daemon_client: httpx.Client, work_dir: Path) -> None:
    response = daemon_client.get("/work-dir")
    assert response.status_code == 200
    assert response.json() == {"dir": str(work_dir)}


def test_unknown_route_is_json_404(daemon_client: httpx.Client) -> None:
    response = daemon_client.get("/no/such/route")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["statusCode"] == 404
    assert body["code"] == "NOT_FOUND"
    assert body["path"] == "/no/such/route"
    assert body["method"] == "GET"
    assert body["source"] == "DAYTONA_DAEMON"
    assert body["timestamp"]


def test_wrong_method_is_json_405(daemon_client: httpx.Client) -> None:
    response = daemon_client.put("/version")
    assert response.status_code == 405
    assert response.json()["statusCode"] == 405


def _raw_exchange(socket_path: Path, payload: bytes, expected_responses: int) -> bytes:
    """Send raw bytes over one connection and read until `expected_responses` bodies have arrived."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(str(socket_path))
        connection.sendall(payload)
        received = b""
        while received.count(b'"version":"0.1.0"') + received.count(b'"statusCode"') < expected_responses:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_keep_alive_serves_pipelined_requests_on_one_connection(daemon_socket: Path) -> None:
    request = b"GET /version HTTP/1.1\r\nHost: daemon\r\n\r\n"
    received = _raw_exchange(daemon_socket, request * 3, expected_responses=3)
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert received.count(b"Content-Length: 19\r\n") == 3


def test_unread_request_body_does_not_break_the_next_request(daemon_socket: Path) -> None:
    # An error response sent before the body was read must still leave the connection in sync.
    body = b"x" * 5000
    first = b"POST /no/such/route HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    second = b"GET /version HTTP/1.1\r\nHost: d\r\n\r\n"
    received = _raw_exchange(daemon_socket, first + second, expected_responses=2)
    assert b"HTTP/1.1 404" in received
    assert b'{"version":"0.1.0"}' in received


def test_json_body_without_content_type_is_accepted(daemon_client: httpx.Client) -> None:
    response = daemon_client.post("/process/execute", content=b'{"command": "echo plain"}')
    assert response.status_code == 200
    assert response.json()["result"] == "plain\n"


def test_malformed_request_line_gets_json_error(daemon_socket: Path) -> None:
    received = _raw_exchange(daemon_socket, b"GET /version NOT-HTTP\r\n\r\n", expected_responses=1)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["statusCode"] == 400


def test_socket_is_for_its_owner_only(daemon_socket: Path) -> None:
    # Issue #7: only the sandbox's root (which binds it) and the host's root (the runner) may connect.
    mode = daemon_socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_replaces_stale_socket_and_removes_it_on_sigterm(
    socket_dir: Path, launch_daemon: Callable[[Path], AbstractContextManager[Path]]
) -> None:
    socket_path = socket_dir / "toolbox.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()  # leaves the socket file behind with nobody listening, like a crashed daemon
    with (
        launch_daemon(socket_path) as live_socket,
        httpx.Client(transport=httpx.HTTPTransport(uds=str(live_socket))) as client,
    ):
        assert client.get("http://daemon/version").status_code == 200
    assert not socket_path.exists()
