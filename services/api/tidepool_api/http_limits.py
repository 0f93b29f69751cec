"""A request head (request line plus headers) larger than a limit gets 431, before it is buffered further.

uvicorn's httptools protocol has no head limit (httptools accumulates a header value until it ends, so a
32 MB header costs 32 MB), and its h11 protocol answers 400 to a head over `h11_max_incomplete_event_size`.
This protocol keeps httptools (the fast parser) and counts the bytes received while a head is incomplete:
past `max_header_bytes` it answers 431 with the API's error envelope, stops parsing, and discards (without
storing) whatever the client still sends for a moment, so the client reads the answer rather than a reset.
Body limits are FastAPI's (`max_body_size`, 413), see app.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DISCARD_MAX_BYTES = 4 * 1024 * 1024  # after a 431, read and drop at most this much ...
DISCARD_SECONDS = 2.0  # ... for at most this long, then close


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

    def _refuse_head(self) -> None:
        message = f"request line and headers are larger than {self.max_header_bytes} bytes"
        body = orjson.dumps(
            {
                "statusCode": 431,
                "message": message,
                "error": "Request Header Fields Too Large",
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
