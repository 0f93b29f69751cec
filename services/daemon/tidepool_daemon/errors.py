"""The daemon's error type and the JSON error envelope the SDK turns into typed exceptions.

The SDK maps `(source == "DAYTONA_DAEMON", code)` to specific exception classes (e.g. FILE_NOT_FOUND ->
DaytonaFileNotFoundError), so every error leaves the daemon in this one envelope.
"""

from __future__ import annotations

import errno
from datetime import UTC, datetime
from typing import Any

ERROR_SOURCE = "DAYTONA_DAEMON"

# Error codes understood by the SDK (see spec §1.6) plus generic ones for HTTP-level failures.
FILE_NOT_FOUND = "FILE_NOT_FOUND"
FILE_ACCESS_DENIED = "FILE_ACCESS_DENIED"
INVALID_FILE_PATH = "INVALID_FILE_PATH"
FILE_READ_FAILED = "FILE_READ_FAILED"
FILE_WRITE_FAILED = "FILE_WRITE_FAILED"
PROCESS_EXECUTION_TIMEOUT = "PROCESS_EXECUTION_TIMEOUT"
BAD_REQUEST = "BAD_REQUEST"
NOT_FOUND = "NOT_FOUND"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
INTERNAL_ERROR = "INTERNAL_ERROR"
# A bounded operation (process/bounded.py) reached one of its bounds.
TIME_LIMIT_EXCEEDED = "TIME_LIMIT_EXCEEDED"
MEMORY_LIMIT_EXCEEDED = "MEMORY_LIMIT_EXCEEDED"
OUTPUT_LIMIT_EXCEEDED = "OUTPUT_LIMIT_EXCEEDED"
TOO_MANY_OPERATIONS = "TOO_MANY_OPERATIONS"

_GENERIC_CODE_BY_STATUS = {
    400: BAD_REQUEST,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    408: "REQUEST_TIMEOUT",
    411: "LENGTH_REQUIRED",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    431: "REQUEST_HEADER_FIELDS_TOO_LARGE",
    500: INTERNAL_ERROR,
    501: "NOT_IMPLEMENTED",
    505: "HTTP_VERSION_NOT_SUPPORTED",
}


def generic_code_for_status(status: int) -> str:
    return _GENERIC_CODE_BY_STATUS.get(status, BAD_REQUEST if 400 <= status < 500 else INTERNAL_ERROR)


class DaemonError(Exception):
    """An error that becomes an HTTP error response; `extra` adds fields to the JSON envelope."""

    def __init__(
        self, status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or generic_code_for_status(status)
        self.extra = extra or {}


def bad_request(message: str) -> DaemonError:
    return DaemonError(400, message, BAD_REQUEST)


def file_error_from_os_error(exc: OSError, display_path: str, *, writing: bool = False) -> DaemonError:
    """Translate an OSError on `display_path` into the status/code pair the SDK expects."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return DaemonError(404, f"file not found: {display_path}", FILE_NOT_FOUND)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DaemonError(403, f"access denied: {display_path}: {reason}", FILE_ACCESS_DENIED)
    if exc.errno in (errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST):
        return DaemonError(400, f"invalid file path: {display_path}: {reason}", INVALID_FILE_PATH)
    if writing:
        return DaemonError(500, f"failed to write {display_path}: {reason}", FILE_WRITE_FAILED)
    return DaemonError(500, f"failed to read {display_path}: {reason}", FILE_READ_FAILED)


def utc_timestamp() -> str:
    """RFC 3339 timestamp with millisecond precision, like the reference daemon's `time.Now()`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_envelope(status: int, message: str, code: str, path: str, method: str) -> dict[str, Any]:
    return {
        "statusCode": status,
        "message": message,
        "code": code,
        "timestamp": utc_timestamp(),
        "path": path,
        "method": method,
        "source": ERROR_SOURCE,
    }


def envelope_for(error: DaemonError, path: str, method: str) -> dict[str, Any]:
    body = error_envelope(error.status, error.message, error.code, path, method)
    body.update(error.extra)
    return body
