"""The daemon's RFC 6455 server: handshake through the real HTTP server, then framing edge cases.

The server tests run `UnixToolboxServer` in-process with a test-only router (echo routes), and talk to it
with the `websockets` client (the SDK's own dependency) and with hand-made raw frames.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import unix_connect

from tests.polling import wait_until
from tidepool_daemon.errors import DaemonError
from tidepool_daemon.httpd.http_io import Request, Response, json_response
from tidepool_daemon.httpd.routing import Router
from tidepool_daemon.httpd.server import UnixToolboxServer
from tidepool_daemon.httpd.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    Message,
    WebSocket,
    accept_key,
    choose_subprotocol,
    encode_frame,
    websocket_upgrade,
)

MASK = b"\x11\x22\x33\x44"


def _echo_session(ws: WebSocket) -> None:
    ws.send_text("ready")
    while True:
        event = ws.receive()
        if isinstance(event, Close):
            return
        if event.data == "close-please":
            ws.close(4001, "asked to close")
            return
        if event.data == "crash":
            raise RuntimeError("handler bug")
        ws.send(event.data)


def _echo(request: Request) -> Response:
    if request.query_value("reject") == "1":
        raise DaemonError(409, "rejected before the upgrade")
    protocol = choose_subprotocol(request, {"proto-a", "proto-b"})
    return websocket_upgrade(request, _echo_session, protocol=protocol)


def _plain(request: Request) -> Response:
    return json_response(200, {"ok": True})


@pytest.fixture
def ws_server() -> Iterator[Path]:
    router = Router()
    router.add("GET", "/echo", _echo)
    router.add("GET", "/plain", _plain)
    directory = Path(tempfile.mkdtemp(prefix="tpws-", dir="/tmp"))
    socket_path = directory / "ws.sock"
    server = UnixToolboxServer(str(socket_path), router)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield socket_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_accept_key_matches_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_echo_text_and_binary_with_subprotocol(ws_server: Path) -> None:
    with unix_connect(str(ws_server), "ws://daemon/echo", subprotocols=["other", "proto-b"]) as ws:
        assert ws.subprotocol == "proto-b"
        assert ws.recv(timeout=5) == "ready"
        ws.send("héllo")
        assert ws.recv(timeout=5) == "héllo"
        ws.send(b"\x00\x01\x02\xff")
        assert ws.recv(timeout=5) == b"\x00\x01\x02\xff"
        big = os.urandom(200_000)  # 64-bit length both ways
        ws.send(big)
        assert ws.recv(timeout=5) == big
        medium = "x" * 1000  # 16-bit length
        ws.send(medium)
        assert ws.recv(timeout=5) == medium
        ws.send(["frag", "mented", " text"])  # fragmented message
        assert ws.recv(timeout=5) == "fragmented text"
        ws.ping(b"keepalive").wait(5)


def test_no_subprotocol_when_none_supported(ws_server: Path) -> None:
    with unix_connect(str(ws_server), "ws://daemon/echo", subprotocols=["nope"]) as ws:
        assert ws.subprotocol is None
        assert ws.recv(timeout=5) == "ready"


def test_server_close_code_and_reason_reach_client(ws_server: Path) -> None:
    with unix_connect(str(ws_server), "ws://daemon/echo") as ws:
        assert ws.recv(timeout=5) == "ready"
        ws.send("close-please")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4001
        assert closed.value.rcvd.reason == "asked to close"


def test_handler_exception_closes_with_1011(ws_server: Path) -> None:
    with unix_connect(str(ws_server), "ws://daemon/echo") as ws:
        assert ws.recv(timeout=5) == "ready"
        ws.send("crash")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


def test_rejection_before_upgrade_keeps_http_status(ws_server: Path) -> None:
    with pytest.raises(InvalidStatus) as rejected:
        unix_connect(str(ws_server), "ws://daemon/echo?reject=1")
    assert rejected.value.response.status_code == 409


def test_plain_get_on_websocket_route_is_426(ws_server: Path) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(ws_server)), base_url="http://d") as client:
        assert client.get("/echo").status_code == 426
        # The keep-alive connection is still usable for ordinary requests afterwards.
        assert client.get("/plain").json() == {"ok": True}


def _raw_handshake(socket_path: Path, extra: bytes = b"") -> tuple[socket.socket, bytes]:
    """Handshake by hand; `extra` bytes are sent in the same write as the request (pipelined frames)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(socket_path))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /echo HTTP/1.1\r\nHost: d\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    sock.sendall(request + extra)
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, response
        response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert f"Sec-WebSocket-Accept: {accept_key(key)}".encode() in head
    return sock, rest


def _read_frame(sock: socket.socket, pending: bytearray) -> tuple[int, bytes]:
    def need(count: int) -> None:
        while len(pending) < count:
            chunk = sock.recv(65536)
            assert chunk, "connection closed"
            pending.extend(chunk)

    need(2)
    opcode = pending[0] & 0x0F
    assert not pending[1] & 0x80, "server frames must not be masked"
    length, offset = pending[1] & 0x7F, 2
    if length == 126:
        need(4)
        (length,) = struct.unpack_from("!H", pending, 2)
        offset = 4
    elif length == 127:
        need(10)
        (length,) = struct.unpack_from("!Q", pending, 2)
        offset = 10
    need(offset + length)
    payload = bytes(pending[offset : offset + length])
    del pending[: offset + length]
    return opcode, payload


def test_frames_pipelined_behind_the_handshake_are_not_lost(ws_server: Path) -> None:
    first = encode_frame(OP_TEXT, b"early", mask=MASK)
    sock, rest = _raw_handshake(ws_server, extra=first)
    pending = bytearray(rest)
    with sock:
        assert _read_frame(sock, pending) == (OP_TEXT, b"ready")
        assert _read_frame(sock, pending) == (OP_TEXT, b"early")


def test_raw_fragments_with_interleaved_ping_and_close_handshake(ws_server: Path) -> None:
    sock, rest = _raw_handshake(ws_server)
    pending = bytearray(rest)
    with sock:
        assert _read_frame(sock, pending) == (OP_TEXT, b"ready")
        sock.sendall(encode_frame(OP_BINARY, b"ab", fin=False, mask=MASK))
        sock.sendall(encode_frame(OP_PING, b"p1", mask=MASK))  # control frame between fragments
        sock.sendall(encode_frame(OP_CONTINUATION, b"cd", fin=False, mask=MASK))
        for byte in encode_frame(OP_CONTINUATION, b"ef", mask=MASK):  # trickled byte by byte
            sock.sendall(bytes([byte]))
            time.sleep(0.001)
        assert _read_frame(sock, pending) == (OP_PONG, b"p1")
        assert _read_frame(sock, pending) == (OP_BINARY, b"abcdef")
        sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye", mask=MASK))
        opcode, payload = _read_frame(sock, pending)
        assert opcode == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == 1000
        assert sock.recv(10) == b""  # the server drops the connection after the handshake


@pytest.mark.parametrize(
    ("frame", "expected_code"),
    [
        (encode_frame(OP_TEXT, b"unmasked"), 1002),
        (encode_frame(OP_TEXT, b"\xff\xfe", mask=MASK), 1007),
        (bytes([0x80 | 0x40 | OP_TEXT, 0x80]) + MASK, 1002),  # RSV1 without an extension
        (encode_frame(OP_PING, b"x" * 126, mask=MASK), 1002),
        (encode_frame(OP_CONTINUATION, b"orphan", mask=MASK), 1002),
        (encode_frame(0x3, b"", mask=MASK), 1002),
    ],
)
def test_protocol_violations_close_with_the_right_code(
    ws_server: Path, frame: bytes, expected_code: int
) -> None:
    sock, rest = _raw_handshake(ws_server)
    pending = bytearray(rest)
    with sock:
        assert _read_frame(sock, pending) == (OP_TEXT, b"ready")
        sock.sendall(frame)
        opcode, payload = _read_frame(sock, pending)
        assert opcode == OP_CLOSE
        assert struct.unpack("!H", payload[:2])[0] == expected_code


# -- the WebSocket class on its own, over a socketpair --------------------------------------------


def _pair() -> tuple[WebSocket, socket.socket]:
    server_end, client_end = socket.socketpair()
    client_end.settimeout(5)
    return WebSocket(server_end), client_end


def test_receive_timeout_keeps_partial_frame() -> None:
    ws, client = _pair()
    frame = encode_frame(OP_TEXT, b"split-frame", mask=MASK)
    client.sendall(frame[:5])
    with pytest.raises(TimeoutError):
        ws.receive(timeout=0.1)
    client.sendall(frame[5:])
    assert ws.receive(timeout=2) == Message("split-frame")
    client.close()
    assert ws.receive(timeout=2).code == 1006  # type: ignore[union-attr]


def test_concurrent_senders_never_interleave_frames() -> None:
    ws, client = _pair()
    payloads = [bytes([index]) * 70_000 for index in range(8)]
    threads = [threading.Thread(target=ws.send_bytes, args=(payload,)) for payload in payloads]
    received: list[bytes] = []
    pending = bytearray()

    def reader() -> None:
        for _ in payloads:
            received.append(_read_frame(client, pending)[1])

    reader_thread = threading.Thread(target=reader)
    reader_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    reader_thread.join(10)
    assert sorted(received) == sorted(payloads)


def _inside(thread: threading.Thread, function: str) -> bool:
    """Whether `thread` is currently running `function` (anywhere on its stack)."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_close_from_another_thread_unblocks_receiver() -> None:
    ws, client = _pair()
    results: list[object] = []
    receiver = threading.Thread(target=lambda: results.append(ws.receive()))
    receiver.start()
    wait_until(lambda: _inside(receiver, "receive"), "the receiver never called receive()")
    pending = bytearray()

    def answer_close() -> None:
        opcode, payload = _read_frame(client, pending)
        assert opcode == OP_CLOSE
        client.sendall(encode_frame(OP_CLOSE, payload, mask=MASK))

    answering = threading.Thread(target=answer_close)
    answering.start()
    ws.close(1000, "done")
    receiver.join(5)
    answering.join(5)
    assert results == [Close(1000, "done")]
    assert ws.closed
