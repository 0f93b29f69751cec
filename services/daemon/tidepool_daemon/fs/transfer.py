"""File content transfer: bulk upload (multipart in), bulk download (multipart out), raw download and the
single-file upload `upload-v2` (multipart field `file` or a raw body) used by signed upload URLs.

Contents are always streamed in bounded chunks; no file is ever held in memory whole.
"""

from __future__ import annotations

import contextlib
import errno
import mimetypes
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import quote

from ..context import DaemonContext
from ..errors import (
    INVALID_FILE_PATH,
    DaemonError,
    bad_request,
    envelope_for,
    error_envelope,
    file_error_from_os_error,
)
from ..httpd.http_io import (
    READ_CHUNK_SIZE,
    Request,
    Response,
    encode_json,
    json_response,
    stream_response,
)
from ..httpd.multipart import (
    MultipartReader,
    PartHeaders,
    boundary_from_content_type,
    parse_header_parameters,
)

DOWNLOAD_BOUNDARY = "DAYTONA-FILE-BOUNDARY"
_UPLOAD_FIELD = re.compile(r"files\[(\d+)\]\.(path|file)")
_MAX_PATH_FIELD_BYTES = 64 * 1024
_SPOOL_PREFIX = ".tidepool-upload-"


def _current_umask() -> int:
    """Read the umask without the racy os.umask() set-and-restore (the daemon is multi-threaded)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status_file:
            for line in status_file:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


_NEW_FILE_MODE = 0o666 & ~_current_umask()


def _copy_stream(source: BinaryIO, destination: BinaryIO) -> int:
    copied = 0
    while chunk := source.read(READ_CHUNK_SIZE):
        destination.write(chunk)
        copied += len(chunk)
    return copied


@dataclass
class _UploadState:
    """Bookkeeping for one bulk upload; parts may arrive in any order, so everything is keyed by index."""

    paths: dict[int, str] = field(default_factory=dict)
    # `.file` parts that arrived before their `.path`: index -> temporary file on disk.
    spooled: dict[int, str] = field(default_factory=dict)
    written: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failed_indexes: set[int] = field(default_factory=set)

    def fail(self, index: int, message: str) -> None:
        self.failed_indexes.add(index)
        self.errors.append(message)


class FileTransferService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    # ----- bulk upload -------------------------------------------------------------------------------

    def bulk_upload(self, request: Request) -> Response:
        boundary = boundary_from_content_type(request.headers.get("Content-Type"))
        reader = MultipartReader(request.body, boundary)
        state = _UploadState()
        body_complete = False
        try:
            while (part := reader.next_part()) is not None:
                self._handle_upload_part(reader, part, state)
            body_complete = True
        except DaemonError as exc:
            state.errors.append(exc.message)
        finally:
            for spool_path in state.spooled.values():
                _remove_quietly(spool_path)
        if body_complete:
            # Only a fully parsed body proves that a `.path` or `.file` partner is really missing.
            for index in state.spooled:
                state.fail(index, f"files[{index}].file has no matching files[{index}].path")
            for index in state.paths:
                if index not in state.written and index not in state.failed_indexes:
                    state.fail(index, f"files[{index}].path has no matching files[{index}].file")

        uploaded = [
            {"path": state.paths[index], "bytes": size} for index, size in sorted(state.written.items())
        ]
        if state.errors:
            message = "; ".join(state.errors)
            body = envelope_for(DaemonError(400, message), request.path, request.method)
            body.update({"errors": state.errors, "files": uploaded})
            return json_response(400, body)
        return json_response(200, {"files": uploaded})

    def _handle_upload_part(self, reader: MultipartReader, part: PartHeaders, state: _UploadState) -> None:
        match = _UPLOAD_FIELD.fullmatch(part.name or "")
        if match is None:
            return  # unknown fields are skipped (next_part() drains them)
        index, kind = int(match.group(1)), match.group(2)
        if kind == "path":
            raw_path = _read_small_part(reader, f"files[{index}].path")
            try:
                state.paths[index] = raw_path.decode("utf-8")
            except UnicodeDecodeError:
                state.fail(index, f"files[{index}].path is not valid UTF-8")
                return
            spool_path = state.spooled.pop(index, None)
            if spool_path is not None:
                self._place_spooled_file(index, spool_path, state)
            return
        if index in state.paths:
            self._write_part_to_destination(index, reader, state)
        else:
            self._spool_part(index, reader, state)

    def _write_part_to_destination(self, index: int, reader: MultipartReader, state: _UploadState) -> None:
        requested = state.paths[index]
        try:
            destination = self._prepare_destination(requested)
            # Written in place (not temp + rename) so an overwritten file keeps its mode and owner.
            with open(destination, "wb") as output:
                written = 0
                while chunk := reader.read_part_data():
                    output.write(chunk)
                    written += len(chunk)
            state.written[index] = written
        except DaemonError as exc:
            state.fail(index, f"{requested}: {exc.message}")
        except OSError as exc:
            state.fail(
                index, f"{requested}: {file_error_from_os_error(exc, requested, writing=True).message}"
            )

    def _spool_part(self, index: int, reader: MultipartReader, state: _UploadState) -> None:
        try:
            descriptor, spool_path = self._make_spool_file()
        except OSError as exc:
            state.fail(index, f"files[{index}].file: cannot create temporary file: {exc.strerror}")
            return
        state.spooled[index] = spool_path
        try:
            with os.fdopen(descriptor, "wb") as output:
                while chunk := reader.read_part_data():
                    output.write(chunk)
        except OSError as exc:
            state.fail(index, f"files[{index}].file: cannot spool upload: {exc.strerror}")
            del state.spooled[index]
            _remove_quietly(spool_path)

    def _make_spool_file(self) -> tuple[int, str]:
        # Prefer the work dir: most uploads land below it, so the final move is a cheap rename.
        try:
            return tempfile.mkstemp(prefix=_SPOOL_PREFIX, dir=self._context.work_dir)
        except OSError:
            return tempfile.mkstemp(prefix=_SPOOL_PREFIX)

    def _place_spooled_file(self, index: int, spool_path: str, state: _UploadState) -> None:
        requested = state.paths[index]
        try:
            size = os.path.getsize(spool_path)
            destination = self._prepare_destination(requested)
            if os.path.isfile(destination):
                # Overwrite in place to keep the existing file's mode and owner.
                with open(spool_path, "rb") as source, open(destination, "wb") as output:
                    _copy_stream(source, output)
            else:
                try:
                    os.replace(spool_path, destination)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    shutil.copyfile(spool_path, destination)
                # mkstemp creates 0600; give the file the mode a normal create would have.
                os.chmod(destination, _NEW_FILE_MODE)
            state.written[index] = size
        except DaemonError as exc:
            state.fail(index, f"{requested}: {exc.message}")
        except OSError as exc:
            state.fail(
                index, f"{requested}: {file_error_from_os_error(exc, requested, writing=True).message}"
            )
        finally:
            _remove_quietly(spool_path)

    def _prepare_destination(self, requested: str) -> str:
        destination = self._context.resolve_path(requested, allow_empty=False)
        if os.path.isdir(destination):
            raise DaemonError(400, f"destination is a directory: {requested}", INVALID_FILE_PATH)
        try:
            os.makedirs(os.path.dirname(destination), exist_ok=True)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested, writing=True) from None
        return destination

    # ----- bulk download -----------------------------------------------------------------------------

    def bulk_download(self, request: Request) -> Response:
        payload = request.json_object_body()
        paths = payload.get("paths")
        if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
            raise bad_request("'paths' must be a list of strings")
        content_type = f"multipart/form-data; boundary={DOWNLOAD_BOUNDARY}"
        # Always 200: per-file failures travel as `error` parts, which the SDK turns into typed errors.
        return stream_response(200, content_type, self._multipart_download_parts(paths, request.method))

    def _multipart_download_parts(self, paths: list[str], method: str) -> Iterator[bytes]:
        for requested in paths:
            try:
                source, size = self._open_regular_file(requested)
            except DaemonError as exc:
                yield _error_part(requested, exc, method)
                continue
            content_type = mimetypes.guess_type(requested)[0] or "application/octet-stream"
            yield _part_head("file", requested, content_type, size)
            yield from _file_chunks(source, size)
            yield b"\r\n"
        yield f"--{DOWNLOAD_BOUNDARY}--\r\n".encode()

    def _open_regular_file(self, requested: str) -> tuple[BinaryIO, int]:
        absolute_path = self._context.resolve_path(requested, allow_empty=False)
        try:
            # Check the type before opening: opening a FIFO would block the response forever.
            if not stat.S_ISREG(os.stat(absolute_path).st_mode):
                raise DaemonError(400, f"not a regular file: {requested}", INVALID_FILE_PATH)
            source = open(absolute_path, "rb")  # noqa: SIM115 - closed by _file_chunks
            return source, os.fstat(source.fileno()).st_size
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None

    # ----- single upload (upload-v2) ------------------------------------------------------------------

    def upload_v2(self, request: Request) -> Response:
        """`POST /files/upload-v2?path=`: multipart (field `file`) or the raw body, streamed to a temporary
        file next to the destination and renamed into place, so a broken upload never leaves half a file."""
        requested = request.query_value("path") or ""
        if not requested:
            raise bad_request("query parameter 'path' is required")
        content_type = request.headers.get("Content-Type") or ""
        media_type, _ = parse_header_parameters(content_type)
        if media_type == "multipart/form-data":
            reader = MultipartReader(request.body, boundary_from_content_type(content_type))
            while (part := reader.next_part()) is not None:
                if part.name == "file":
                    break
            else:
                raise bad_request("multipart upload has no 'file' field")
            chunks: Iterator[bytes] = iter(reader.read_part_data, b"")
            declared_type = part.headers.get("content-type", "")
        else:
            chunks = iter(request.body.read, b"")
            declared_type = content_type
        # An existing symlink is written through (like the in-place bulk upload), not replaced.
        destination = os.path.realpath(self._prepare_destination(requested))
        written = _write_atomically(destination, requested, chunks)
        file_type = parse_header_parameters(declared_type)[0] if declared_type else ""
        if not file_type or file_type == "multipart/form-data":
            file_type = mimetypes.guess_type(destination)[0] or "application/octet-stream"
        return json_response(
            200,
            {"name": os.path.basename(destination), "path": destination, "type": file_type, "size": written},
        )

    # ----- raw download ------------------------------------------------------------------------------

    def download(self, request: Request) -> Response:
        requested = request.require_query("path")
        source, size = self._open_regular_file(requested)
        name = os.path.basename(requested) or "download"
        disposition = f'attachment; filename="{_quote_header_value(name)}"; {_extended_filename(name)}'
        return stream_response(
            200,
            "application/octet-stream",
            _file_chunks(source, size),
            content_length=size,
            extra_headers=[("Content-Disposition", disposition)],
        )


def _write_atomically(destination: str, requested: str, chunks: Iterator[bytes]) -> int:
    """Stream `chunks` into a temporary sibling of `destination`, then rename it over the destination,
    keeping an existing file's mode (and owner, when permitted). Returns the number of bytes written."""
    try:
        existing: os.stat_result | None = os.stat(destination)
    except OSError:
        existing = None
    if existing is not None and not os.access(destination, os.W_OK):
        # Like writing in place would: a read-only file is not silently replaced.
        raise file_error_from_os_error(
            PermissionError(errno.EACCES, "Permission denied"), requested, writing=True
        )
    try:
        descriptor, temp_path = tempfile.mkstemp(prefix=_SPOOL_PREFIX, dir=os.path.dirname(destination))
    except PermissionError:
        # A read-only directory may still hold a writable file: then write that file in place.
        if existing is None:
            raise file_error_from_os_error(
                PermissionError(errno.EACCES, "Permission denied"), requested, writing=True
            ) from None
        return _write_in_place(destination, requested, chunks)
    except OSError as exc:
        raise file_error_from_os_error(exc, requested, writing=True) from None
    try:
        with os.fdopen(descriptor, "wb") as output:
            written = 0
            for chunk in chunks:
                output.write(chunk)
                written += len(chunk)
        if existing is not None:
            os.chmod(temp_path, stat.S_IMODE(existing.st_mode))
            if (existing.st_uid, existing.st_gid) != (os.getuid(), os.getgid()):
                with contextlib.suppress(OSError):
                    os.chown(temp_path, existing.st_uid, existing.st_gid)
        else:
            os.chmod(temp_path, _NEW_FILE_MODE)  # mkstemp creates 0600
        os.replace(temp_path, destination)
    except OSError as exc:
        _remove_quietly(temp_path)
        raise file_error_from_os_error(exc, requested, writing=True) from None
    except BaseException:
        _remove_quietly(temp_path)
        raise
    return written


def _write_in_place(destination: str, requested: str, chunks: Iterator[bytes]) -> int:
    written = 0
    try:
        with open(destination, "wb") as output:
            for chunk in chunks:
                output.write(chunk)
                written += len(chunk)
    except OSError as exc:
        raise file_error_from_os_error(exc, requested, writing=True) from None
    return written


def _file_chunks(source: BinaryIO, size: int) -> Iterator[bytes]:
    """Yield at most `size` bytes: the size was announced up front, so a growing file is cut off there."""
    remaining = size
    try:
        while remaining > 0:
            chunk = source.read(min(READ_CHUNK_SIZE, remaining))
            if not chunk:
                return  # file shrank; the response writer notices the short body
            remaining -= len(chunk)
            yield chunk
    finally:
        source.close()


def _read_small_part(reader: MultipartReader, field_name: str) -> bytes:
    collected = bytearray()
    while chunk := reader.read_part_data():
        collected += chunk
        if len(collected) > _MAX_PATH_FIELD_BYTES:
            raise bad_request(f"{field_name} is too long")
    return bytes(collected)


def _quote_header_value(value: str) -> str:
    """Quoted-string content for a header parameter; CR/LF are percent-encoded to prevent injection."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return escaped.replace("\r", "%0D").replace("\n", "%0A")


def _extended_filename(value: str) -> str:
    # RFC 5987 form; the SDK prefers it over `filename`, so it must round-trip the path exactly.
    return "filename*=utf-8''" + quote(value, safe="", encoding="utf-8", errors="surrogatepass")


def _part_head(field_name: str, requested: str, content_type: str, content_length: int) -> bytes:
    disposition = (
        f'form-data; name="{field_name}"; filename="{_quote_header_value(requested)}"; '
        f"{_extended_filename(requested)}"
    )
    head = (
        f"--{DOWNLOAD_BOUNDARY}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Disposition: {disposition}\r\n"
        f"Content-Length: {content_length}\r\n"
        "\r\n"
    )
    return head.encode("utf-8", "surrogatepass")


def _error_part(requested: str, error: DaemonError, method: str) -> bytes:
    body = encode_json(error_envelope(error.status, error.message, error.code, requested, method))
    return _part_head("error", requested, "application/json; charset=utf-8", len(body)) + body + b"\r\n"


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
