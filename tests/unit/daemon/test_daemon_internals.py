"""In-process tests of daemon pieces that are hard to reach over HTTP: the multipart scanner, chunked
decoding and the errno -> error-code mapping."""

from __future__ import annotations

import errno
import io
import os

import pytest

from tidepool_daemon.errors import DaemonError, file_error_from_os_error
from tidepool_daemon.httpd.http_io import ChunkedBody, RequestBody
from tidepool_daemon.httpd.multipart import MultipartReader, parse_header_parameters


class TrickleBody(RequestBody):
    """Delivers a body a few bytes at a time so every boundary gets split across reads."""

    def __init__(self, payload: bytes, step: int) -> None:
        super().__init__()
        self._payload = payload
        self._offset = 0
        self._step = step

    def _read_some(self, size: int) -> bytes:
        chunk = self._payload[self._offset : self._offset + min(size, self._step)]
        self._offset += len(chunk)
        return chunk


def _multipart(boundary: bytes, parts: list[tuple[bytes, bytes]]) -> bytes:
    body = b"preamble to ignore\r\n"
    for disposition, content in parts:
        body += (
            b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content + b"\r\n"
        )
    return body + b"--" + boundary + b"--\r\nepilogue"


def _read_all_parts(reader: MultipartReader) -> list[tuple[str | None, bytes]]:
    parts = []
    while (part := reader.next_part()) is not None:
        content = b""
        while chunk := reader.read_part_data(1000):
            content += chunk
        parts.append((part.name, content))
    return parts


@pytest.mark.parametrize("step", [1, 3, 17, 4096, 1 << 20])
def test_multipart_reader_survives_any_read_split(step: int) -> None:
    boundary = b"xyzBOUNDARY"
    # Content that contains near-misses of the delimiter must come through untouched.
    tricky = b"\r\n--xyzBOUNDAR\r\n-\r\n--" + os.urandom(5000) + b"\r\n--xyzBOUNDARz"
    payload = _multipart(
        boundary,
        [(b'form-data; name="files[0].path"', b"a/b.txt"), (b'form-data; name="f"; filename="x"', tricky)],
    )
    reader = MultipartReader(TrickleBody(payload, step), boundary)
    assert _read_all_parts(reader) == [("files[0].path", b"a/b.txt"), ("f", tricky)]


def test_multipart_reader_rejects_truncated_body() -> None:
    boundary = b"B"
    payload = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nunterminated'
    reader = MultipartReader(TrickleBody(payload, 5), boundary)
    assert reader.next_part() is not None
    with pytest.raises(DaemonError):
        while reader.read_part_data():
            pass


def test_parse_header_parameters_keeps_paths_exact() -> None:
    media, params = parse_header_parameters(
        'form-data; name="files[0].file"; filename="C:\\\\dir\\\\a \\"b\\".txt"'
    )
    assert media == "form-data"
    assert params == {"name": "files[0].file", "filename": 'C:\\dir\\a "b".txt'}


def test_chunked_body_decodes_and_stops_at_last_chunk() -> None:
    stream = io.BytesIO(b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: x\r\n\r\nNEXT REQUEST")
    body = ChunkedBody(stream)
    assert body.read_all(1000) == b"hello world!"
    assert stream.read() == b"NEXT REQUEST"


@pytest.mark.parametrize(
    ("error_number", "status", "code"),
    [
        (errno.ENOENT, 404, "FILE_NOT_FOUND"),
        (errno.ENOTDIR, 404, "FILE_NOT_FOUND"),
        (errno.EACCES, 403, "FILE_ACCESS_DENIED"),
        (errno.EPERM, 403, "FILE_ACCESS_DENIED"),
        (errno.EISDIR, 400, "INVALID_FILE_PATH"),
        (errno.EIO, 500, "FILE_READ_FAILED"),
    ],
)
def test_os_errors_map_to_sdk_error_codes(error_number: int, status: int, code: str) -> None:
    error = file_error_from_os_error(OSError(error_number, os.strerror(error_number)), "some/path")
    assert (error.status, error.code) == (status, code)
    assert "some/path" in error.message


def test_bounded_output_spool_moves_to_a_file_or_stays_in_memory_on_a_full_disk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bounded job's result is kept until the job's status is known: past 4 MiB in a temporary file, or,
    when none can be made (a full disk), in memory up to 64 MiB, then OSError (answered 507)."""
    from tidepool_daemon.process import bounded

    block = bytes(range(256)) * 4096  # 1 MiB
    spool = bounded._Spool()
    for _ in range(6):
        spool.write(block)
    assert spool.rewind() == 6 * len(block)
    assert not spool._in_memory
    assert spool.read(len(block)) == block
    spool.close()

    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bounded.tempfile, "TemporaryFile", no_room)
    full = bounded._Spool()
    for _ in range(64):
        full.write(block)
    assert full._in_memory
    with pytest.raises(OSError):
        full.write(b"one byte too many")
    assert full.rewind() == 64 * len(block)
    assert full.read(10) == block[:10]
    full.close()


def test_supervisor_keeps_trying_when_no_worker_can_be_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork bomb exhausts the sandbox's process limit: the supervisor must not exit (its exit ends the
    container with every user process) but try again until a worker starts."""
    import subprocess

    from tidepool_daemon.supervisor import Supervisor, parse_args

    supervisor = Supervisor(parse_args(["--socket", "/nonexistent/toolbox.sock"]))
    attempts: list[bool] = []

    def spawn(first: bool) -> subprocess.Popen[bytes]:
        attempts.append(first)
        if len(attempts) < 3:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        supervisor._stopping = True  # the third worker starts, ends, and the supervisor is asked to stop
        return subprocess.Popen(["true"])

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    supervisor._supervise()
    assert attempts == [True, True, True], "every attempt is still the first worker (entrypoint included)"
