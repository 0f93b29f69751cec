"""Request/response plumbing shared by all endpoints: body readers, the Request and Response types.

Request bodies are exposed as incremental readers (never buffered whole by default) so uploads can be
streamed to disk, and both Content-Length and chunked bodies look the same to handlers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import DaemonError, bad_request

# Annotations only: the bounded job process (process/bounded_job.py) imports this module too.
if TYPE_CHECKING:
    from email.message import Message

READ_CHUNK_SIZE = 64 * 1024
# JSON bodies (commands, path lists) are small; this only stops a runaway client from exhausting memory.
MAX_JSON_BODY_BYTES = 32 * 1024 * 1024
# Leftover body bytes we are willing to read and discard to keep a keep-alive connection usable.
MAX_DISCARD_BYTES = 4 * 1024 * 1024
_MAX_CHUNK_LINE_BYTES = 4096


class BodyFramingError(DaemonError):
    """The request body is malformed at the HTTP level; the connection cannot be reused afterwards."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class RequestBody:
    """Incremental reader over one request body. `read()` returns b"" once the body is exhausted."""

    def __init__(self) -> None:
        self.finished = False

    def _read_some(self, size: int) -> bytes:
        raise NotImplementedError

    def read(self, size: int = READ_CHUNK_SIZE) -> bytes:
        if self.finished or size <= 0:
            return b""
        data = self._read_some(size)
        if not data:
            self.finished = True
        return data

    def read_all(self, limit: int) -> bytes:
        """Read the whole body, failing with 413 once it exceeds `limit` bytes."""
        parts: list[bytes] = []
        total = 0
        while chunk := self.read():
            total += len(chunk)
            if total > limit:
                raise DaemonError(413, f"request body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def settle(self) -> bool:
        """Discard unread body bytes so the next request on this connection parses cleanly.

        Returns False when the body could not be consumed (too large or broken framing): the caller must
        then close the connection instead of reusing it.
        """
        discarded = 0
        try:
            while chunk := self.read():
                discarded += len(chunk)
                if discarded > MAX_DISCARD_BYTES:
                    return False
        except (DaemonError, OSError):
            return False
        return True


class EmptyBody(RequestBody):
    def __init__(self) -> None:
        super().__init__()
        self.finished = True

    def _read_some(self, size: int) -> bytes:
        return b""


class LengthDelimitedBody(RequestBody):
    def __init__(self, stream: BinaryIO, length: int) -> None:
        super().__init__()
        self._stream = stream
        self._remaining = length
        self.finished = length == 0

    def _read_some(self, size: int) -> bytes:
        if self._remaining <= 0:
            return b""
        data = self._stream.read(min(size, self._remaining))
        if not data:
            raise BodyFramingError("request body ended before Content-Length bytes were received")
        self._remaining -= len(data)
        return data


class ChunkedBody(RequestBody):
    """Decoder for `Transfer-Encoding: chunked` (the SDK's streaming upload sends no Content-Length)."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self._stream = stream
        self._remaining_in_chunk = 0
        self._saw_last_chunk = False

    def _read_line(self) -> bytes:
        line = self._stream.readline(_MAX_CHUNK_LINE_BYTES + 1)
        if not line.endswith(b"\n"):
            raise BodyFramingError("malformed chunked request body")
        return line

    def _start_next_chunk(self) -> None:
        size_field = self._read_line().split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise BodyFramingError("malformed chunk size in request body") from None
        if size < 0:
            raise BodyFramingError("malformed chunk size in request body")
        if size == 0:
            # Skip optional trailer fields up to the terminating empty line.
            while self._read_line().strip():
                pass
            self._saw_last_chunk = True
        self._remaining_in_chunk = size

    def _read_some(self, size: int) -> bytes:
        if self._saw_last_chunk:
            return b""
        if self._remaining_in_chunk == 0:
            self._start_next_chunk()
            if self._saw_last_chunk:
                return b""
        data = self._stream.read(min(size, self._remaining_in_chunk))
        if not data:
            raise BodyFramingError("chunked request body ended prematurely")
        self._remaining_in_chunk -= len(data)
        if self._remaining_in_chunk == 0 and self._read_line().strip():
            raise BodyFramingError("missing CRLF after chunk data")
        return data


def body_for_request(headers: Message, stream: BinaryIO) -> RequestBody:
    """Pick the body reader that matches the request's framing headers."""
    transfer_encoding = (headers.get("Transfer-Encoding") or "").strip().lower()
    if transfer_encoding:
        codings = [coding.strip() for coding in transfer_encoding.split(",")]
        if codings[-1] != "chunked":
            raise BodyFramingError(f"unsupported Transfer-Encoding: {transfer_encoding}")
        return ChunkedBody(stream)
    raw_length = headers.get("Content-Length")
    if raw_length is None:
        return EmptyBody()
    try:
        length = int(raw_length.strip())
    except ValueError:
        raise BodyFramingError(f"invalid Content-Length: {raw_length!r}") from None
    if length < 0:
        raise BodyFramingError(f"invalid Content-Length: {raw_length!r}")
    return LengthDelimitedBody(stream, length)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: RequestBody
    path_params: dict[str, str] = field(default_factory=dict)

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def require_query(self, name: str) -> str:
        value = self.query_value(name)
        if value is None:
            raise bad_request(f"query parameter '{name}' is required")
        return value

    def json_body(self, *, empty: Any = None) -> Any:
        """The parsed JSON body; an empty body is `empty` when given, else a 400."""
        raw = self.body.read_all(MAX_JSON_BODY_BYTES)
        if not raw.strip():
            if empty is not None:
                return empty
            raise bad_request("request body is required")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad_request(f"invalid JSON body: {exc}") from None

    def json_object_body(self, *, optional: bool = False) -> dict[str, Any]:
        """A JSON object body. `optional`: an empty body counts as `{}` (some SDK calls send none)."""
        payload = self.json_body(empty={} if optional else None)
        if not isinstance(payload, dict):
            raise bad_request("request body must be a JSON object")
        return payload


@dataclass
class Response:
    """A response to write. `body` is either complete bytes or an iterator of chunks to stream.

    For streamed bodies `content_length` is sent when known; otherwise chunked encoding is used.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterable[bytes] = b""
    content_length: int | None = None


def encode_json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def json_response(status: int, payload: Any) -> Response:
    return Response(status, [("Content-Type", "application/json")], encode_json(payload))


def empty_response(status: int) -> Response:
    return Response(status)


def stream_response(
    status: int,
    content_type: str,
    chunks: Iterator[bytes],
    content_length: int | None = None,
    extra_headers: list[tuple[str, str]] | None = None,
) -> Response:
    headers = [("Content-Type", content_type), *(extra_headers or [])]
    return Response(status, headers, chunks, content_length)
