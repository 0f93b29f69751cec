"""Streaming HTTP and WebSocket relay between an aiohttp server request and an upstream aiohttp session.

Bodies are never buffered: request chunks go upstream as they arrive and response chunks go back as they come,
so multi-GB transfers and long-running execs cost constant memory. Shared by the proxy (user -> runner) and
the runner (runner -> daemon's unix socket), which may share nothing but this package.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http import HTTPStatus

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

# RFC 9110 §7.6.1 connection-specific headers, which a relay must not forward.
HOP_BY_HOP_HEADERS: frozenset[str] = frozenset(
    istr(name)
    for name in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        # Our own server already answered `Expect: 100-continue`; the upstream must not be asked again.
        "Expect",
    )
)
# Produced by each WebSocket client anew for its own handshake.
WEBSOCKET_HANDSHAKE_HEADERS: frozenset[str] = frozenset(
    istr(name)
    for name in (
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
    )
)
# aiohttp would otherwise invent these when the client did not send them (e.g. `POST /env` must arrive
# without a Content-Type, exactly as the SDK sends it).
SESSION_SKIP_AUTO_HEADERS: tuple[str, ...] = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

# WebSocket close codes that exist only locally and may not be sent in a close frame (RFC 6455 §7.4.1).
NO_STATUS_CLOSE_CODE = 1005
ABNORMAL_CLOSE_CODE = 1006
NORMAL_CLOSE_CODE = 1000
INTERNAL_ERROR_CLOSE_CODE = 1011
UPSTREAM_WS_CLOSE_TIMEOUT = 10.0


class UpstreamUnreachableError(Exception):
    """The upstream could not be connected to (or dropped the connection before answering)."""


class UpstreamRejectedUpgradeError(Exception):
    """The upstream answered a WebSocket upgrade with an ordinary HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream rejected the websocket upgrade with status {status}")
        self.status = status


def _connection_listed_headers(headers: CIMultiDictProxy[str]) -> set[str]:
    """Headers named in `Connection: a, b` are hop-by-hop for this hop too."""
    listed: set[str] = set()
    for value in headers.getall("Connection", []):
        listed.update(istr(token.strip()) for token in value.split(",") if token.strip())
    return listed


def upstream_request_headers(
    headers: CIMultiDictProxy[str], *, drop: Iterable[str] = (), extra: dict[str, str] | None = None
) -> CIMultiDict[str]:
    excluded = set(HOP_BY_HOP_HEADERS) | _connection_listed_headers(headers) | {istr("Host")}
    excluded.update(istr(name) for name in drop)
    forwarded: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in headers.items() if istr(name) not in excluded
    )
    for name, value in (extra or {}).items():
        forwarded[name] = value
    return forwarded


def downstream_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    excluded = set(HOP_BY_HOP_HEADERS) | _connection_listed_headers(headers) | {istr("Content-Length")}
    return CIMultiDict((name, value) for name, value in headers.items() if istr(name) not in excluded)


def is_websocket_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def offered_subprotocols(request: web.Request) -> list[str]:
    offered: list[str] = []
    for value in request.headers.getall("Sec-WebSocket-Protocol", []):
        offered.extend(token.strip() for token in value.split(",") if token.strip())
    return offered


async def relay_http(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    adjust_headers: Callable[[CIMultiDict[str]], None] | None = None,
) -> web.StreamResponse:
    """Send `request` to `url` and stream the answer back. Raises UpstreamUnreachableError before any byte
    was answered; once the response is under way, an upstream failure just ends (aborts) the response.
    `adjust_headers` may edit the response's headers before they are sent (e.g. CORS of previews)."""
    body = request.content.iter_any() if request.body_exists else None
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            # Transfer encodings (gzip) pass through untouched, byte-identical.
            auto_decompress=False,
        )
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
        raise UpstreamUnreachableError(str(error)) from error
    try:
        response_headers = downstream_response_headers(upstream.headers)
        if adjust_headers is not None:
            adjust_headers(response_headers)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=response_headers
        )
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except ConnectionResetError:  # the client went away: nobody is left to answer
                return response
            # An upstream failure mid-body propagates instead: aiohttp then drops the client connection, so a
            # truncated body can't pass for a complete one.
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def relay_websocket(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    protocols: list[str] | None = None,
) -> web.WebSocketResponse:
    """Open the upstream WebSocket first (so a rejected upgrade keeps its HTTP status), then accept the
    client's with the subprotocol the upstream chose, and pump frames both ways until either side closes.
    `protocols`: what to offer upstream (default: what the client offered)."""
    upstream_headers = CIMultiDict(
        (name, value) for name, value in headers.items() if istr(name) not in WEBSOCKET_HANDSHAKE_HEADERS
    )
    try:
        upstream = await session.ws_connect(
            url,
            headers=upstream_headers,
            protocols=offered_subprotocols(request) if protocols is None else protocols,
            autoclose=False,
            autoping=True,
            max_msg_size=0,
            compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=UPSTREAM_WS_CLOSE_TIMEOUT),
        )
    except aiohttp.WSServerHandshakeError as error:
        raise UpstreamRejectedUpgradeError(error.status) from error
    except aiohttp.ClientConnectionError as error:
        raise UpstreamUnreachableError(str(error)) from error

    downstream = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=True,
        max_msg_size=0,
        compress=False,
    )
    try:
        await downstream.prepare(request)
        await _pump_both_ways(downstream, upstream)
    finally:
        if not upstream.closed:
            await upstream.close()
    return downstream


WebSocketEnd = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump_both_ways(
    downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Relay frames until one side closes, then close the other with the same code and reason (a PTY's exit
    status travels in the daemon's close frame)."""
    to_upstream = asyncio.create_task(_pump_frames(downstream, upstream))
    to_downstream = asyncio.create_task(_pump_frames(upstream, downstream))
    try:
        done, _ = await asyncio.wait({to_upstream, to_downstream}, return_when=asyncio.FIRST_COMPLETED)
        finished = done.pop()
        closer, other = (downstream, upstream) if finished is to_upstream else (upstream, downstream)
        code, reason = _closing_status(finished)
    finally:
        # Cancelling a pending receive() is safe in aiohttp; it lets close() below run without a reader race.
        for task in (to_upstream, to_downstream):
            task.cancel()
        await asyncio.gather(to_upstream, to_downstream, return_exceptions=True)
    # Acknowledge the closer's close frame, then pass the same close on to the other side.
    await closer.close(code=code, message=reason)
    await other.close(code=code, message=reason)


def _closing_status(finished: asyncio.Task[tuple[int, bytes]]) -> tuple[int, bytes]:
    if finished.cancelled() or finished.exception() is not None:
        return INTERNAL_ERROR_CLOSE_CODE, b""
    return finished.result()


async def _pump_frames(source: WebSocketEnd, sink: WebSocketEnd) -> tuple[int, bytes]:
    """Copy data frames from source to sink; return the close code and reason when the source ends."""
    while True:
        message = await source.receive()
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is WSMsgType.CLOSE:
            return _sendable_close(message.data, message.extra)
        elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return _sendable_close(source.close_code, None)
        # PING/PONG never get here: autoping answers them per hop.


def _sendable_close(code: int | None, reason: str | None) -> tuple[int, bytes]:
    if code is None or code == NO_STATUS_CLOSE_CODE:
        code = NORMAL_CLOSE_CODE
    elif code == ABNORMAL_CLOSE_CODE:
        code = INTERNAL_ERROR_CLOSE_CODE
    return code, (reason or "").encode()


ERROR_SOURCE = "DAYTONA_PROXY"


def error_response(request: web.Request, status: int, message: str) -> web.Response:
    """The toolbox error envelope for failures of the relay itself (not of the daemon)."""
    return web.json_response(
        {
            "statusCode": status,
            "message": message,
            "error": _reason_phrase(status),
            "source": ERROR_SOURCE,
            "path": request.path,
            "timestamp": datetime.now(UTC).isoformat(),
        },
        status=status,
    )


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
