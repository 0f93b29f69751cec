"""Incremental multipart/form-data reader with a bounded buffer.

The stdlib `cgi` module is deprecated and buffers whole parts; uploads can be gigabytes, so this reader
scans the request stream for the boundary and hands out part bodies piece by piece.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import bad_request
from .http_io import READ_CHUNK_SIZE, RequestBody

_MAX_HEADER_LINE_BYTES = 16 * 1024
_MAX_HEADERS_PER_PART = 64


@dataclass(frozen=True)
class PartHeaders:
    headers: dict[str, str]  # lower-cased header names
    name: str | None
    filename: str | None


def parse_header_parameters(value: str) -> tuple[str, dict[str, str]]:
    """Split `form-data; name="a"; filename="b"` into ("form-data", {"name": "a", "filename": "b"}).

    Quoted values keep everything between the quotes (backslash escapes a character), so paths survive.
    """
    parameters: dict[str, str] = {}
    main_value, _, rest = value.partition(";")
    position, length = 0, len(rest)
    while position < length:
        while position < length and rest[position] in " \t;":
            position += 1
        name_start = position
        while position < length and rest[position] not in "=;":
            position += 1
        name = rest[name_start:position].strip().lower()
        if position >= length or rest[position] != "=":
            continue
        position += 1
        while position < length and rest[position] in " \t":
            position += 1
        if position < length and rest[position] == '"':
            position += 1
            chars: list[str] = []
            while position < length and rest[position] != '"':
                if rest[position] == "\\" and position + 1 < length:
                    position += 1
                chars.append(rest[position])
                position += 1
            position += 1  # closing quote
            parsed = "".join(chars)
            while position < length and rest[position] != ";":
                position += 1
        else:
            value_start = position
            while position < length and rest[position] != ";":
                position += 1
            parsed = rest[value_start:position].strip()
        if name and name not in parameters:
            parameters[name] = parsed
    return main_value.strip().lower(), parameters


def boundary_from_content_type(content_type: str | None) -> bytes:
    media_type, parameters = parse_header_parameters(content_type or "")
    if media_type != "multipart/form-data":
        raise bad_request(f"expected multipart/form-data, got {content_type or 'no Content-Type'}")
    boundary = parameters.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise bad_request("multipart/form-data request without a valid boundary")
    return boundary.encode("latin-1", "replace")


class MultipartReader:
    """Walks the parts of a multipart body: call `next_part()`, then `read_part_data()` until b""."""

    def __init__(self, body: RequestBody, boundary: bytes) -> None:
        self._body = body
        self._delimiter = b"\r\n--" + boundary
        # Pretend a CRLF preceded the body so the first boundary matches the same delimiter as the rest.
        self._buffer = bytearray(b"\r\n")
        # The preamble before the first boundary is consumed like the body of an anonymous part.
        self._in_part = True
        self._finished = False
        self._started = False

    def _fill(self) -> bool:
        data = self._body.read(READ_CHUNK_SIZE)
        if not data:
            return False
        self._buffer += data
        return True

    def _take(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def read_part_data(self, size: int = READ_CHUNK_SIZE) -> bytes:
        """Next piece of the current part's body; b"" once the part ends."""
        if not self._in_part:
            return b""
        while True:
            index = self._buffer.find(self._delimiter)
            if index == 0:
                self._in_part = False
                return b""
            if index > 0:
                return self._take(min(index, size))
            # Keep a tail that could be the start of a delimiter split across reads.
            safe_length = len(self._buffer) - (len(self._delimiter) - 1)
            if safe_length > 0:
                return self._take(min(safe_length, size))
            if not self._fill():
                where = "inside a part" if self._started else "before the first boundary"
                raise bad_request(f"multipart body ended {where}")

    def _read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = self._take(end)
                del self._buffer[:2]
                return line
            if len(self._buffer) > _MAX_HEADER_LINE_BYTES:
                raise bad_request("multipart header line too long")
            if not self._fill():
                raise bad_request("multipart body ended inside part headers")

    def _ensure_buffered(self, count: int) -> None:
        while len(self._buffer) < count:
            if not self._fill():
                raise bad_request("multipart body ended without a closing boundary")

    def next_part(self) -> PartHeaders | None:
        """Skip whatever is left of the current part and parse the next part's headers."""
        if self._finished:
            return None
        while self.read_part_data():
            pass
        self._started = True
        # The buffer now starts with the delimiter; what follows tells a new part from the end.
        self._ensure_buffered(len(self._delimiter) + 2)
        del self._buffer[: len(self._delimiter)]
        if self._buffer[:2] == b"--":
            self._finished = True
            return None
        if self._read_line().strip(b" \t"):
            raise bad_request("malformed multipart boundary line")
        headers: dict[str, str] = {}
        last_name: str | None = None
        for _ in range(_MAX_HEADERS_PER_PART + 1):
            line = self._read_line().decode("utf-8", "replace")
            if not line:
                break
            if line[0] in " \t" and last_name is not None:  # obsolete header folding
                headers[last_name] += " " + line.strip()
                continue
            name, separator, value = line.partition(":")
            if not separator:
                raise bad_request(f"malformed multipart header: {line[:100]!r}")
            last_name = name.strip().lower()
            headers[last_name] = value.strip()
        else:
            raise bad_request("too many multipart part headers")
        _, disposition = parse_header_parameters(headers.get("content-disposition", ""))
        self._in_part = True
        return PartHeaders(headers, disposition.get("name"), disposition.get("filename"))
