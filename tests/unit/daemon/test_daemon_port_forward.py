"""The daemon's `CONNECT localhost:{port}` tunnel (previews): bytes both ways, loopback targets only."""

from __future__ import annotations

import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidepool_daemon.httpd.routing import Router
from tidepool_daemon.httpd.server import UnixToolboxServer
from tidepool_daemon.port_forward import parse_target


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while chunk := self.request.recv(65536):
            self.request.sendall(chunk)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def daemon_socket() -> Iterator[str]:
    directory = Path(tempfile.mkdtemp(prefix="tpfw-", dir="/tmp"))
    socket_path = directory / "fw.sock"
    server = UnixToolboxServer(str(socket_path), Router())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield str(socket_path)
    finally:
        server.shutdown()
        server.server_close()
        directory.rmdir()


def _connect(socket_path: str, target: str) -> tuple[socket.socket, bytes]:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(socket_path)
    client.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(1)
        if not chunk:
            break
        head += chunk
    return client, head


def _read_all(client: socket.socket) -> bytes:
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def test_tunnel_carries_bytes_both_ways_and_the_end(daemon_socket: str, echo_port: int) -> None:
    client, head = _connect(daemon_socket, f"localhost:{echo_port}")
    with client:
        assert head.startswith(b"HTTP/1.1 200 ")
        payload = bytes(range(256)) * 1000
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)  # the echo server sees the end, and so the tunnel ends
        assert _read_all(client) == payload


def test_closed_port_is_a_502(daemon_socket: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    client, head = _connect(daemon_socket, f"127.0.0.1:{free_port}")
    with client:
        assert head.startswith(b"HTTP/1.1 502 ")
        assert f"port {free_port}".encode() in _read_all(client)


@pytest.mark.parametrize("target", ["example.com:80", "10.0.0.1:80", "localhost:0", "localhost:70000", "x"])
def test_only_loopback_ports_are_targets(daemon_socket: str, target: str) -> None:
    assert parse_target(target) is None
    client, head = _connect(daemon_socket, target)
    with client:
        assert head.startswith(b"HTTP/1.1 400 ")
