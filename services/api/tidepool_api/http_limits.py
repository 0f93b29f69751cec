"""Request size limits at the edge (issue #9 item 3): bodies over a limit get 413, heads get 431.

Bodies (`BodyLimitMiddleware`): a declared Content-Length over the limit is answered at once, before the
body is read; a chunked body is counted while it streams and refused as soon as it passes the limit. The
answer is the API's error envelope with `Connection: close` (the rest of the body is never read). No API
route takes a large body: file uploads go to the toolbox proxy and build context to object storage.

Heads (`BoundedHttpToolsProtocol`): a request head (request line plus headers) larger than a limit gets
431, before it is buffered further.

uvicorn's httptools protocol has no head limit (httptools accumulates a header value until it ends, so a
32 MB header costs 32 MB), and its h11 protocol answers 400 to a head over `h11_max_incomplete_event_size`.
This protocol keeps httptools (the fast parser) and counts the bytes received while a head is incomplete:
past `max_header_bytes` it answers 431 with the API's error envelope, stops parsing, and discards (without
storing) whatever the client still sends for a moment, so the client reads the answer rather than a reset.
Body limits are FastAPI's (`max_body_size`, 413), see app.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tidepool_api.errors import error_response

DISCARD_MAX_BYTES = 4 * 1024 * 1024  # after a 431, read and drop at most this much ...
DISCARD_SECONDS = 2.0  # ... for at most this long, then close
PATH_SHOWN_MAX = 1024  # characters of the path a 431 answer repeats


class BodyTooLargeError(HTTPException):
    """Raised from `receive` while a body streams past the limit; FastAPI re-raises HTTPExceptions met while
    parsing a body (anything else would become its 400 "error parsing the body"), and the API's handler
    answers with the envelope."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, body_too_large_message(limit), headers={"Connection": "close"})


def body_too_large_message(limit: int) -> str:
    return f"request body is larger than {limit} bytes (TIDEPOOL_API_MAX_BODY_BYTES)"


class NulGuardMiddleware:
    """400 for a NUL character in the path or the query (`%00`): no identifier or filter contains one, and
    PostgreSQL refuses NUL in text, so such a request must never reach a query (it would be a 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")):
            response = error_response(Request(scope), 400, "the path and query must not contain NUL (%00)")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(Request(scope), 413, body_too_large_message(limit))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True  # a new connection starts with a head
        self._discarded: int | None = None  # set once the head was refused

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._discarded is not None:
            self._discarded += len(data)
            if self._discarded > DISCARD_MAX_BYTES:
                self.transport.close()
            return
        counting = self._in_head
        super().data_received(data)
        if counting and self._in_head and not self.transport.is_closing():
            # Still inside the same head (a chunk that completes it resets the count in on_headers_complete).
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse_head()

    def _path_so_far(self) -> str:
        url = bytes(getattr(self, "url", b"") or b"")
        return url.split(b"?", 1)[0][:PATH_SHOWN_MAX].decode("latin-1")

    def _refuse_head(self) -> None:
        message = f"request line and headers are larger than {self.max_header_bytes} bytes"
        body = orjson.dumps(
            {
                "statusCode": 431,
                "message": message,
                "error": "Request Header Fields Too Large",
                # As far as it was read (the head may be over the limit in its request line already).
                "path": self._path_so_far(),
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "source": "DAYTONA_API",
            }
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self._discarded = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(DISCARD_SECONDS, self.transport.close)


def bounded_http_protocol(max_header_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`, refusing heads over `max_header_bytes`."""
    return type(
        "BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"max_header_bytes": max_header_bytes}
    )
