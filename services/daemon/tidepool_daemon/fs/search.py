"""Content search (`/files/find`), name search (`/files/search`) and search-and-replace (`/files/replace`).

How each one matches, exactly as Daytona's daemon does (issue #19 item 4):

- find: a plain-text match, like `grep -F`: a line matches when it contains the pattern's bytes literally
  (case-sensitive; no character is special, so `$5.00 (` finds `price: $5.00 (approx)`). Every regular
  file below the path is read line by line (`\n` ends a line, a `\r` before it is dropped); a file
  whose first 8 KiB contain a NUL byte is binary and skipped, symlinks are not followed, unreadable files
  and folders are skipped. Results: `[{file, line, content}]`, `line` 1-based, `file` joined to the path
  as given. A line longer than 1 MiB is examined in 1 MiB pieces (overlapping by the pattern's length, so
  no occurrence is missed) and reported once, with the piece where the pattern first occurs.
- search: a glob (`*`, `?`, `[...]`, `**`, `{a,b}`; see globs.py) on each entry's basename, recursively
  (`*.txt` finds `a/b/c.txt`); a pattern containing `/` is matched against the path relative to the
  search root instead (`src/**/*.go`). Files and folders are both reported; symlinked folders are not
  entered. The glob is matched in linear time (never as a backtracking regex).
- replace: literal, like Go's `strings.ReplaceAll` upstream: every non-overlapping occurrence of the
  pattern's bytes, leftmost first. A file is only rewritten if the pattern occurs in it (atomically,
  through a temporary file, keeping its mode and owner); a symlink's target is rewritten.

No pattern is ever a regular expression, so no pattern can make matching super-linear. All three still
run in a bounded child process (process/bounded.py): their cost grows with the tree, the files and the result,
which the user controls. Results are streamed from the walk into the child's output, so neither a huge
tree nor a huge file is ever held in memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from ..context import DaemonContext
from ..errors import INVALID_FILE_PATH, DaemonError, bad_request, file_error_from_os_error
from ..httpd.http_io import READ_CHUNK_SIZE, Request, Response, encode_json
from .globs import Glob, GlobError

# Files whose first bytes contain a NUL are treated as binary and skipped (upstream checks 512 bytes,
# grep a buffer; this is in between).
BINARY_SNIFF_BYTES = 8192
# A "line" longer than this is examined in pieces of this size, so one giant line (a minified bundle, a
# log without newlines) cannot exhaust memory.
MAX_LINE_BYTES = 1024 * 1024
# Matched lines are reported truncated to this many characters.
MAX_REPORTED_LINE_CHARS = 64 * 1024
# Results are written out in batches of about this size.
_STREAM_BATCH_BYTES = 64 * 1024
_REPLACE_CHUNK_BYTES = 1024 * 1024
_REPLACE_TEMP_PREFIX = ".tidepool-replace-"
# Temporary files of replacements under way (bounded child only, one thread).
_temp_files: set[str] = set()


class SearchService:
    """The HTTP side, in the daemon; the work itself runs in a bounded child (the `*_job` functions)."""

    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    # ----- /files/find ----------------------------------------------------------------------------------

    def find_in_files(self, request: Request) -> Response:
        requested = request.query_value("path") or ""
        pattern = request.query_value("pattern") or ""
        if not requested or not pattern:
            raise bad_request("path and pattern are required")
        root = self._context.resolve_path(requested)
        try:
            root_status = os.stat(root)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None
        if stat.S_ISDIR(root_status.st_mode):
            _require_listable(root, requested)
            kind = "dir"
        elif stat.S_ISREG(root_status.st_mode):
            kind = "file"
        else:
            kind = "other"
        params = {"root": root, "requested": requested, "kind": kind, "pattern": pattern}
        return _run_bounded("find", params)

    # ----- /files/search --------------------------------------------------------------------------------

    def search_files(self, request: Request) -> Response:
        requested = request.query_value("path") or ""
        pattern = request.query_value("pattern") or ""
        if not requested or not pattern:
            raise bad_request("path and pattern are required")
        _compile_glob(pattern)  # a refused pattern fails here, before any process is started
        root = self._context.resolve_path(requested)
        try:
            if not stat.S_ISDIR(os.stat(root).st_mode):
                raise DaemonError(400, f"not a directory: {requested}", INVALID_FILE_PATH)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None
        _require_listable(root, requested)
        params = {"root": root, "requested": requested, "pattern": pattern}
        return _run_bounded("search", params)

    # ----- /files/replace -------------------------------------------------------------------------------

    def replace_in_files(self, request: Request) -> Response:
        payload = request.json_object_body()
        files = payload.get("files")
        pattern = payload.get("pattern")
        new_value = payload.get("newValue", "")
        if not isinstance(files, list) or not all(isinstance(item, str) for item in files):
            raise bad_request("'files' must be a list of paths")
        if not isinstance(pattern, str) or not pattern:
            raise bad_request("'pattern' must be a non-empty string")
        if new_value is None:
            new_value = ""
        if not isinstance(new_value, str):
            raise bad_request("'newValue' must be a string")
        targets: list[list[str | None]] = []
        for requested in files:
            try:
                targets.append([requested, self._context.resolve_path(requested, allow_empty=False), None])
            except DaemonError as exc:
                targets.append([requested, None, exc.message])
        params = {"files": targets, "pattern": pattern, "newValue": new_value}
        return _run_bounded("replace", params)


def _run_bounded(kind: str, params: dict[str, Any]) -> Response:
    # Imported here: the bounded child imports this module for its jobs and must start fast.
    from ..process.bounded import run_bounded

    return run_bounded(kind, params, what=kind)


# ----- jobs (run in the bounded child, see process/bounded_job.py) ------------------------------------------


def find_job(params: dict[str, Any], out: BinaryIO) -> None:
    """`params`: root (absolute), requested (as given), kind (dir | file | other), pattern."""
    root, requested, kind = params["root"], params["requested"], params["kind"]
    needle = str(params["pattern"]).encode("utf-8", "surrogatepass")
    if kind == "dir":
        files = _walk_files(root, requested)
    elif kind == "file":
        files = iter([(root, os.path.normpath(requested))])
    else:
        files = iter(())
    matches = (
        {"file": shown, "line": line_number, "content": content}
        for absolute_path, shown in files
        for line_number, content in _matching_lines(absolute_path, needle)
    )
    _write_batched(out, b"[", matches, b"]")


def search_job(params: dict[str, Any], out: BinaryIO) -> None:
    """`params`: root (absolute, a folder), requested (as given), pattern (a glob)."""
    root, requested, pattern = params["root"], params["requested"], str(params["pattern"])
    glob = _compile_glob(pattern)
    match_relative_path = "/" in pattern

    def found() -> Iterator[str]:
        for relative, _is_dir in _walk_entries(root):
            subject = relative if match_relative_path else os.path.basename(relative)
            if glob.matches(subject):
                yield os.path.normpath(os.path.join(requested, relative))

    _write_batched(out, b'{"files":[', found(), b"]}")


def replace_job(params: dict[str, Any], out: BinaryIO) -> None:
    """`params`: files ([requested, absolute or None, error or None] each), pattern, newValue."""
    old = str(params["pattern"]).encode("utf-8", "surrogatepass")
    new = str(params["newValue"]).encode("utf-8", "surrogatepass")

    def results() -> Iterator[dict[str, Any]]:
        for requested, absolute_path, error in params["files"]:
            if absolute_path is None:
                yield {"file": requested, "success": False, "error": error}
                continue
            try:
                count = replace_in_file(absolute_path, requested, old, new)
            except DaemonError as exc:
                yield {"file": requested, "success": False, "error": exc.message}
                continue
            yield {"file": requested, "success": True, "replacements": count}

    _write_batched(out, b"[", results(), b"]")


# ----- matching -------------------------------------------------------------------------------------------


def _compile_glob(pattern: str) -> Glob:
    try:
        return Glob(pattern)
    except GlobError as exc:
        raise bad_request(f"invalid glob pattern: {exc}") from None


def _matching_lines(absolute_path: str, needle: bytes) -> Iterator[tuple[int, str]]:
    try:
        source = open(absolute_path, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return  # unreadable files are skipped, like upstream
    with source:
        try:
            head = source.read(BINARY_SNIFF_BYTES)
            if b"\x00" in head:
                return
            source.seek(0)
            yield from _scan_lines(source, needle)
        except OSError:
            return


def _scan_lines(source: BinaryIO, needle: bytes) -> Iterator[tuple[int, str]]:
    """(line number, content) of every line containing `needle`, reading at most MAX_LINE_BYTES at once."""
    line_number = 1
    overlap = len(needle) - 1
    tail = b""  # the end of the previous piece of the same (long) line
    reported = False  # this line was already reported
    while piece := source.readline(MAX_LINE_BYTES):
        complete = piece.endswith(b"\n")
        if complete:
            piece = piece[:-2] if piece.endswith(b"\r\n") else piece[:-1]
        if not reported and needle in (tail + piece if tail else piece):
            reported = True
            yield line_number, piece.decode("utf-8", "replace")[:MAX_REPORTED_LINE_CHARS]
        if complete:
            line_number += 1
            tail = b""
            reported = False
        else:
            tail = piece[-overlap:] if overlap else b""


def _require_listable(directory: str, requested: str) -> None:
    """An unreadable search root is an error (403), not an empty result; deeper ones are just skipped."""
    try:
        os.scandir(directory).close()
    except OSError as exc:
        raise file_error_from_os_error(exc, requested) from None


# ----- walking --------------------------------------------------------------------------------------------


def _walk_entries(root: str, relative: str = "") -> Iterator[tuple[str, bool]]:
    """(path relative to root, is_dir) for everything below root, sorted; symlinked dirs are not entered
    and unreadable directories are skipped."""
    directory = os.path.join(root, relative) if relative else root
    try:
        with os.scandir(directory) as iterator:
            entries = sorted(iterator, key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        child = os.path.join(relative, entry.name) if relative else entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        yield child, is_dir
        if is_dir:
            yield from _walk_entries(root, child)


def _walk_files(root: str, requested: str) -> Iterator[tuple[str, str]]:
    """(absolute path, path as reported) of every regular file below root (symlinks are not followed)."""
    for relative, is_dir in _walk_entries(root):
        if is_dir:
            continue
        absolute_path = os.path.join(root, relative)
        try:
            if not stat.S_ISREG(os.lstat(absolute_path).st_mode):
                continue
        except OSError:
            continue
        yield absolute_path, os.path.normpath(os.path.join(requested, relative))


# ----- output -------------------------------------------------------------------------------------------


def _write_batched(out: BinaryIO, opening: bytes, items: Iterator[Any], closing: bytes) -> None:
    """Write `opening`, the items as comma-separated JSON, then `closing`, in batches."""
    buffer = bytearray(opening)
    first = True
    for item in items:
        if not first:
            buffer += b","
        first = False
        buffer += encode_json(item)
        if len(buffer) >= _STREAM_BATCH_BYTES:
            out.write(buffer)
            buffer.clear()
    buffer += closing
    out.write(buffer)


# ----- replacing ------------------------------------------------------------------------------------------


def replace_in_file(absolute_path: str, requested: str, old: bytes, new: bytes) -> int:
    """Replace every occurrence of `old` in one file, streaming through a temporary file; the file is only
    rewritten when something changed, and keeps its mode and (when permitted) its owner. Returns the count."""
    try:
        # Replace what a symlink points to, not the link itself.
        target = os.path.realpath(absolute_path)
        status = os.stat(target)
        if not stat.S_ISREG(status.st_mode):
            raise DaemonError(400, f"not a regular file: {requested}", INVALID_FILE_PATH)
        source = open(target, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise file_error_from_os_error(exc, requested) from None
    temp_path: str | None = None
    try:
        with source:
            if not _contains(source, old):
                return 0  # nothing to do: no temporary file, no rewrite
            source.seek(0)
            temp_fd, temp_path = _make_temp_near(target)
            with os.fdopen(temp_fd, "wb") as output:
                count = _stream_replace(source, output, old, new)
        if count:
            # A stop (bound reached) waits until the file is whole again: never leave it half-copied.
            with _stops_deferred():
                _install(temp_path, target, status)
                _remove_temp_file(temp_path)  # gone already if it was renamed into place
    except OSError as exc:
        raise file_error_from_os_error(exc, requested, writing=True) from None
    finally:
        if temp_path is not None:
            _remove_temp_file(temp_path)
    return count


def _contains(source: BinaryIO, needle: bytes) -> bool:
    """Whether `needle` occurs in the rest of `source`, reading it in bounded chunks."""
    keep = len(needle) - 1
    tail = b""
    while chunk := source.read(_REPLACE_CHUNK_BYTES):
        if needle in (tail + chunk if tail else chunk):
            return True
        tail = chunk[-keep:] if keep else b""
    return False


@contextlib.contextmanager
def _stops_deferred() -> Iterator[None]:
    """Hold back the bounded job's stop signals (SIGTERM, SIGXCPU) for the duration of the block."""
    stops = {signal.SIGTERM, signal.SIGXCPU}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stream_replace(source: BinaryIO, output: BinaryIO, old: bytes, new: bytes) -> int:
    """Leftmost, non-overlapping replacement (exactly `bytes.replace`), in bounded memory: only a tail
    shorter than `old` is carried from one chunk to the next."""
    count = 0
    keep = len(old) - 1
    buffer = b""
    while True:
        chunk = source.read(_REPLACE_CHUNK_BYTES)
        buffer += chunk
        position = 0
        while (found := buffer.find(old, position)) != -1:
            output.write(buffer[position:found])
            output.write(new)
            count += 1
            position = found + len(old)
        if not chunk:
            output.write(buffer[position:])
            return count
        tail_start = max(position, len(buffer) - keep)
        output.write(buffer[position:tail_start])
        buffer = buffer[tail_start:]


def _make_temp_near(target: str) -> tuple[int, str]:
    """A new file (0600) next to `target`, or in the temp dir when that folder is read-only for us. Its
    path is registered before the file exists, so a stop at any moment finds it (remove_temp_files)."""
    import tempfile  # only here: the job process starts faster without it

    for directory in (os.path.dirname(target), tempfile.gettempdir()):
        for _attempt in range(100):
            path = os.path.join(directory, _REPLACE_TEMP_PREFIX + os.urandom(8).hex())
            _temp_files.add(path)
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
            except FileExistsError:
                _temp_files.discard(path)
            except PermissionError:
                # The folder is read-only for us but the file may still be writable: spool elsewhere
                # and copy back in place.
                _temp_files.discard(path)
                break
    raise PermissionError(f"cannot create a temporary file for {target}")


def _remove_temp_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    _temp_files.discard(path)


def remove_temp_files() -> None:
    """Remove the temporary files of replacements still under way: the bounded job calls this when it is
    stopped (a bound was reached), whatever it was doing at that moment."""
    for path in list(_temp_files):
        with contextlib.suppress(OSError):
            _remove_temp_file(path)


def _install(temp_path: str, target: str, original: os.stat_result) -> None:
    if os.path.dirname(temp_path) == os.path.dirname(target):
        os.chmod(temp_path, stat.S_IMODE(original.st_mode))
        if (original.st_uid, original.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(OSError):
                os.chown(temp_path, original.st_uid, original.st_gid)
        os.replace(temp_path, target)
        return
    with open(temp_path, "rb") as source, open(target, "r+b") as output:
        output.truncate(0)
        while chunk := source.read(READ_CHUNK_SIZE):
            output.write(chunk)
