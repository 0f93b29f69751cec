"""RFC 6455 WebSocket, server side, over a connection the HTTP server has just upgraded.

How a route uses it
-------------------
A route handler that wants a WebSocket validates the request as usual (raising `DaemonError` still
answers with an ordinary HTTP error, e.g. 409 or 400 *before* any upgrade), then returns
`websocket_upgrade(request, on_open, protocol=...)`::

    def connect(self, request: Request) -> Response:
        session = self._find(request.path_params["id"])          # 404 as a normal HTTP answer
        protocol = choose_subprotocol(request, {"X-My-Protocol"})  # or None: accept without one
        return websocket_upgrade(request, lambda ws: self._serve(session, ws), protocol=protocol)

    def _serve(self, session, ws: WebSocket) -> None:
        ws.send_text('{"hello": 1}')
        while True:
            event = ws.receive()                # Message or Close; pings are answered internally
            if isinstance(event, Close):
                return
            ws.send_bytes(event.as_bytes())

`websocket_upgrade` checks the handshake headers (400, or 426 for a wrong version) and returns a
`WebSocketUpgrade` response. The server then writes `101 Switching Protocols` (with
`Sec-WebSocket-Accept` and the chosen `Sec-WebSocket-Protocol`) and calls `on_open(ws)` on the
connection's own thread (an optional `greeting` message is sent together with the 101, before
`on_open` runs). When `on_open` returns the server closes the WebSocket (1000, or 1011 if
`on_open` raised) unless it is already closed, and drops the TCP/unix connection: there is no
keep-alive after an upgrade.

The `WebSocket` object
----------------------
* `send_text(str)`, `send_bytes(bytes)`, `send(str | bytes)`, `ping(bytes)`: thread-safe; any number
  of threads may send at once (frames are never interleaved). They raise `ConnectionClosed` once a close
  frame was sent or the socket failed.
* `receive(timeout=None)` returns the next complete data message as `Message` (fragmented messages are
  reassembled) or a `Close(code, reason)` once the peer closed (the close handshake is answered
  automatically; later calls return the same `Close`). An abrupt disconnect gives `Close(1006)`, a
  protocol violation sends the matching close code (1002/1007/1009) and returns it. With a timeout it
  raises `TimeoutError` and keeps partial frames buffered, so it can be called again. Pings are answered
  and pongs swallowed inside `receive`. Only one thread may receive at a time.
* `close(code=1000, reason="")`: sends the close frame (once), waits briefly for the peer's answer and
  shuts the socket down; safe to call from any thread and more than once. A thread blocked in
  `receive()` then returns the `Close`. `send_close(code, reason)` only sends the frame, for a thread
  that is not the receiving one and must not block (the receiver then gets the peer's answer).
* `closed`, `subprotocol` and `close_sent` describe the state.

Client frames must be masked; frames this server sends are not (RFC 6455 §5.1). Extensions
(permessage-deflate) are never negotiated.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import DaemonError, bad_request
from .http_io import Request, Response

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUPPORTED_VERSION = "13"

# Opcodes (RFC 6455 §5.2)
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

# Close codes (RFC 6455 §7.4.1)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005  # never sent: "the close frame had no code"
CLOSE_ABNORMAL = 1006  # never sent: "the connection dropped without a close frame"
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# How long close() waits for the peer's close frame before dropping the connection anyway.
CLOSE_HANDSHAKE_TIMEOUT_SECONDS = 2.0
_RECV_SIZE = 64 * 1024
_MAX_CONTROL_PAYLOAD = 125
_MAX_REASON_BYTES = 123  # a close payload is at most 125 bytes including the 2-byte code


class ConnectionClosed(Exception):
    """Sending on a WebSocket that is closed (or closing, or whose socket failed)."""


class _ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """One complete data message: `str` for a text message, `bytes` for a binary one."""

    data: str | bytes

    @property
    def is_text(self) -> bool:
        return isinstance(self.data, str)

    def as_bytes(self) -> bytes:
        return self.data.encode("utf-8") if isinstance(self.data, str) else self.data

    def as_text(self) -> str:
        return self.data if isinstance(self.data, str) else self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Close:
    """The end of the conversation: the peer's close code and reason (1006 when it just disappeared)."""

    code: int
    reason: str = ""


@dataclass
class WebSocketUpgrade(Response):
    """Returned by a route handler to switch the connection to WebSocket (see the module docstring)."""

    on_open: Callable[[WebSocket], None] | None = None
    protocol: str | None = None
    accept: str = ""
    greeting: str | bytes | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    request: Request | None = field(default=None, repr=False)


def accept_key(client_key: str) -> str:
    digest = hashlib.sha1((client_key.strip() + WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _header_tokens(request: Request, name: str) -> list[str]:
    tokens: list[str] = []
    for value in request.headers.get_all(name) or []:
        tokens.extend(token.strip() for token in value.split(",") if token.strip())
    return tokens


def is_websocket_request(request: Request) -> bool:
    """True when the client asks for a WebSocket upgrade (whether or not the handshake is valid)."""
    return any(token.lower() == "websocket" for token in _header_tokens(request, "Upgrade"))


def offered_subprotocols(request: Request) -> list[str]:
    """The client's `Sec-WebSocket-Protocol` tokens in the order offered."""
    return _header_tokens(request, "Sec-WebSocket-Protocol")


def choose_subprotocol(request: Request, supported: Iterable[str]) -> str | None:
    """The first offered subprotocol that the server supports, or None (accept without a protocol)."""
    supported_set = set(supported)
    return next((token for token in offered_subprotocols(request) if token in supported_set), None)


def websocket_upgrade(
    request: Request,
    on_open: Callable[[WebSocket], None],
    protocol: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    greeting: str | bytes | None = None,
) -> WebSocketUpgrade:
    """Validate the handshake and build the response that hands the connection to `on_open`.

    `greeting` (text for str, binary for bytes) goes out in the same write as the 101 response, so the
    client has it the moment its handshake completes (the SDK's PTY handle waits only ~100 ms for its
    `connected` message before giving up)."""
    if request.method != "GET":
        raise bad_request("a WebSocket upgrade must use GET")
    if not is_websocket_request(request):
        raise DaemonError(426, "this endpoint requires a WebSocket upgrade", "UPGRADE_REQUIRED")
    if not any(token.lower() == "upgrade" for token in _header_tokens(request, "Connection")):
        raise bad_request("WebSocket upgrade without 'Connection: Upgrade'")
    version = (request.headers.get("Sec-WebSocket-Version") or "").strip()
    if version != SUPPORTED_VERSION:
        raise DaemonError(
            426,
            f"unsupported WebSocket version {version!r}; this server speaks {SUPPORTED_VERSION}",
            "UPGRADE_REQUIRED",
        )
    key = (request.headers.get("Sec-WebSocket-Key") or "").strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) != 16:
        raise bad_request("invalid Sec-WebSocket-Key")
    if protocol is not None and protocol not in offered_subprotocols(request):
        raise ValueError(f"subprotocol {protocol!r} was not offered by the client")
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(key))]
    if protocol is not None:
        headers.append(("Sec-WebSocket-Protocol", protocol))
    return WebSocketUpgrade(
        status=101,
        headers=headers,
        on_open=on_open,
        protocol=protocol,
        accept=accept_key(key),
        max_message_bytes=max_message_bytes,
        request=request,
        greeting=greeting,
    )


def take_buffered_bytes(sock: socket.socket, reader: BinaryIO) -> bytes:
    """Drain what the HTTP layer's buffered reader already pulled off `sock` without blocking.

    A client may send its first frame right behind the handshake; those bytes can sit in the reader's
    buffer, and the WebSocket reads the raw socket from then on.
    """
    parts: list[bytes] = []
    previous_timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        read1 = getattr(reader, "read1", None)
        while read1 is not None:
            try:
                chunk = read1(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            parts.append(chunk)
    finally:
        sock.settimeout(previous_timeout)
    return b"".join(parts)


class WebSocket:
    """An open server-side WebSocket over a connected stream socket (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        initial_bytes: bytes = b"",
        subprotocol: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._sock = sock
        self.subprotocol = subprotocol
        self._max_message_bytes = max_message_bytes
        self._buffer = bytearray(initial_bytes)
        self._send_lock = threading.Lock()
        self._receive_lock = threading.Lock()
        self._close_sent = False
        self._close_received: Close | None = None
        self._peer_closed = threading.Event()
        self._socket_shut = False
        self._eof = False
        # Reassembly state of a fragmented data message.
        self._fragment_opcode: int | None = None
        self._fragments: list[bytes] = []
        self._fragment_bytes = 0
        sock.settimeout(None)

    # -- state ------------------------------------------------------------------------------------

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @property
    def closed(self) -> bool:
        """True once either side started closing or the socket failed."""
        return self._close_sent or self._close_received is not None or self._socket_shut

    # -- sending ----------------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._send_frame(OP_TEXT, text.encode("utf-8", "surrogatepass"))

    def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        self._send_frame(OP_BINARY, bytes(data))

    def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.send_text(data)
        else:
            self.send_bytes(data)

    def ping(self, payload: bytes = b"") -> None:
        if len(payload) > _MAX_CONTROL_PAYLOAD:
            raise ValueError("ping payload is limited to 125 bytes")
        self._send_frame(OP_PING, payload)

    def _send_frame(self, opcode: int, payload: bytes, *, closing: bool = False) -> None:
        frame = encode_frame(opcode, payload)
        with self._send_lock:
            if self._close_sent or self._socket_shut:
                raise ConnectionClosed("the WebSocket is closed")
            if closing:
                self._close_sent = True
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                self._close_sent = True
                raise ConnectionClosed(f"sending failed: {exc}") from exc

    def _send_close_frame(self, code: int | None, reason: str) -> bool:
        """Send the close frame unless one went out already; False when it could not be sent."""
        payload = b"" if code is None else struct.pack("!H", code) + _truncate_reason(reason)
        try:
            self._send_frame(OP_CLOSE, payload, closing=True)
        except ConnectionClosed:
            return False
        return True

    # -- closing ----------------------------------------------------------------------------------

    def send_close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send the close frame without waiting: the thread that receives sees the peer's answer as a
        `Close` (use this from a thread other than the receiving one; `close()` does the whole handshake)."""
        _check_close_code(code)
        self._send_close_frame(code, reason)

    def close(
        self, code: int = CLOSE_NORMAL, reason: str = "", timeout: float = CLOSE_HANDSHAKE_TIMEOUT_SECONDS
    ) -> None:
        """Start (or finish) the closing handshake, wait up to `timeout` for the peer, drop the socket."""
        _check_close_code(code)
        self._send_close_frame(code, reason)
        if self._close_received is None and not self._socket_shut:
            if self._receive_lock.acquire(timeout=timeout):
                try:
                    self._await_peer_close(time.monotonic() + timeout)
                finally:
                    self._receive_lock.release()
            else:
                # Another thread is receiving; it will see the peer's close frame.
                self._peer_closed.wait(timeout)
        self._shutdown_socket()

    def _await_peer_close(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            while self._close_received is None and not self._socket_shut:
                self._receive_event(deadline)

    def _shutdown_socket(self) -> None:
        with self._send_lock:
            if self._socket_shut:
                return
            self._socket_shut = True
            self._close_sent = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._peer_closed.set()

    # -- receiving --------------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Message | Close:
        """The next data message or the peer's Close; raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._close_received is not None:
            return self._close_received
        if not self._receive_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            raise TimeoutError("another thread is receiving")
        try:
            while True:
                event = self._receive_event(deadline)
                if event is not None:
                    return event
        finally:
            self._receive_lock.release()

    def _receive_event(self, deadline: float | None) -> Message | Close | None:
        """Process one frame: a complete message or Close, or None for control frames and fragments."""
        if self._close_received is not None:
            return self._close_received
        try:
            frame = self._next_frame(deadline)
            if frame is None:
                return self._finish(Close(CLOSE_ABNORMAL, "connection closed without a close frame"))
            return self._handle_frame(*frame)
        except _ProtocolViolation as violation:
            self._send_close_frame(violation.code, violation.reason)
            self._shutdown_socket()
            return self._finish(Close(violation.code, violation.reason))

    def _finish(self, close: Close) -> Close:
        self._close_received = close
        self._peer_closed.set()
        return close

    def _handle_frame(self, fin: bool, opcode: int, payload: bytes) -> Message | Close | None:
        if opcode == OP_PING:
            with contextlib.suppress(ConnectionClosed):
                self._send_frame(OP_PONG, payload)
            return None
        if opcode == OP_PONG:
            return None
        if opcode == OP_CLOSE:
            close = _parse_close_payload(payload)
            # Echo the close (RFC 6455 §5.5.1) unless we started the handshake ourselves.
            echo_code = None if close.code == CLOSE_NO_STATUS else close.code
            self._send_close_frame(echo_code, "")
            self._shutdown_socket()
            return self._finish(close)
        return self._assemble(fin, opcode, payload)

    def _assemble(self, fin: bool, opcode: int, payload: bytes) -> Message | None:
        if opcode == OP_CONTINUATION:
            if self._fragment_opcode is None:
                raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
        elif self._fragment_opcode is not None:
            raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "new message before the previous one ended")
        else:
            self._fragment_opcode = opcode
        self._fragment_bytes += len(payload)
        if self._fragment_bytes > self._max_message_bytes:
            raise _ProtocolViolation(CLOSE_MESSAGE_TOO_BIG, "message too big")
        self._fragments.append(payload)
        if not fin:
            return None
        message_opcode = self._fragment_opcode
        data = b"".join(self._fragments)
        self._fragment_opcode = None
        self._fragments = []
        self._fragment_bytes = 0
        if message_opcode == OP_TEXT:
            try:
                return Message(data.decode("utf-8"))
            except UnicodeDecodeError:
                raise _ProtocolViolation(CLOSE_INVALID_PAYLOAD, "text message is not valid UTF-8") from None
        return Message(data)

    def _next_frame(self, deadline: float | None) -> tuple[bool, int, bytes] | None:
        """The next complete frame from the socket, or None at end of stream."""
        while True:
            parsed = self._parse_buffered_frame()
            if parsed is not None:
                return parsed
            if self._eof or self._socket_shut:
                return None
            if not self._fill(deadline):
                self._eof = True

    def _fill(self, deadline: float | None) -> bool:
        """Read more bytes into the buffer; False at end of stream. Raises TimeoutError at `deadline`."""
        if deadline is not None:
            remaining = max(deadline - time.monotonic(), 0.0)
            poller = select.poll()  # not select(): descriptors above FD_SETSIZE are fine
            try:
                poller.register(self._sock, select.POLLIN)
                ready = poller.poll(remaining * 1000)
            except (OSError, ValueError):  # the socket was closed under us
                return False
            if not ready:
                raise TimeoutError("no WebSocket message before the timeout")
        try:
            chunk = self._sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not chunk:
            return False
        self._buffer += chunk
        return True

    def _parse_buffered_frame(self) -> tuple[bool, int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        fin = bool(first & 0x80)
        if first & 0x70:
            raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        opcode = first & 0x0F
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
            raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not second & 0x80:
            raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            if length >> 63:
                raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "invalid frame length")
            offset = 10
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "control frame payload too long")
        elif self._fragment_bytes + length > self._max_message_bytes:
            raise _ProtocolViolation(CLOSE_MESSAGE_TOO_BIG, "message too big")
        if len(buffer) < offset + 4 + length:
            return None
        mask = bytes(buffer[offset : offset + 4])
        start = offset + 4
        payload = _apply_mask(bytes(buffer[start : start + length]), mask)
        del buffer[: start + length]
        return fin, opcode, payload


def encode_message(data: str | bytes) -> bytes:
    """A complete unmasked server frame for one text (str) or binary (bytes) message."""
    if isinstance(data, str):
        return encode_frame(OP_TEXT, data.encode("utf-8", "surrogatepass"))
    return encode_frame(OP_BINARY, data)


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame; servers send unmasked frames, `mask` exists for tests acting as a client."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if mask is None:
        return header + payload
    return header + mask + _apply_mask(payload, mask)


def _apply_mask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    # XOR through big integers: fast in pure Python even for multi-megabyte payloads.
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return masked.to_bytes(len(payload), "big")


def _check_close_code(code: int) -> None:
    if code in (CLOSE_NO_STATUS, CLOSE_ABNORMAL) or not (1000 <= code <= 4999):
        raise ValueError(f"close code {code} may not be sent")


def _truncate_reason(reason: str) -> bytes:
    encoded = reason.encode("utf-8", "replace")
    if len(encoded) <= _MAX_REASON_BYTES:
        return encoded
    return encoded[:_MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _parse_close_payload(payload: bytes) -> Close:
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    reserved = code in (1004, CLOSE_NO_STATUS, CLOSE_ABNORMAL, 1015) or 1016 <= code < 3000
    if code < 1000 or reserved or code > 4999:
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtocolViolation(CLOSE_INVALID_PAYLOAD, "close reason is not valid UTF-8") from None
    return Close(code, reason)
