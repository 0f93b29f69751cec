"""Content search (`/files/find`), name search (`/files/search`) and search-and-replace (`/files/replace`).

Results are streamed as JSON while the tree is walked, and file contents are read in bounded chunks, so
neither a huge tree nor a huge file is ever held in memory.

Semantics, reconciling upstream (v0.190 daemon) with the SDK's documentation:
- find: upstream matches a plain substring per line; the SDK documents it as "similar to grep". A line
  matches when it contains the pattern literally OR the pattern, as a Python regular expression, matches
  somewhere in it. So every upstream (substring) match is still found, and regexes work too. A pattern
  that is not a valid regular expression is refused with 400 and a message saying how to escape it.
- search: a glob on the basename, recursive (`*.txt` finds `a/b/c.txt`); a pattern containing `/` is
  matched against the path relative to the search root instead, with `**` spanning directories.
  `{a,b}` alternatives are supported. Files and directories are both reported (SDK docs).
- replace: a literal (not regex) replacement, like upstream `strings.ReplaceAll`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from .context import DaemonContext
from .errors import INVALID_FILE_PATH, DaemonError, bad_request, file_error_from_os_error
from .http_io import READ_CHUNK_SIZE, Request, Response, encode_json, json_response, stream_response

# Files whose first bytes contain a NUL are treated as binary and skipped (upstream checks 512 bytes,
# grep a buffer; this is in between).
BINARY_SNIFF_BYTES = 8192
# A "line" longer than this is examined (and reported) in pieces of this size, so one giant line (a
# minified bundle, a log without newlines) cannot exhaust memory.
MAX_LINE_BYTES = 1024 * 1024
# Matched lines are reported truncated to this many characters.
MAX_REPORTED_LINE_CHARS = 64 * 1024
# Results are flushed to the socket in batches of about this size.
_STREAM_BATCH_BYTES = 64 * 1024
_REPLACE_CHUNK_BYTES = 1024 * 1024
_REPLACE_TEMP_PREFIX = ".tidepool-replace-"


class SearchService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    # ----- /files/find ----------------------------------------------------------------------------------

    def find_in_files(self, request: Request) -> Response:
        requested = request.query_value("path") or ""
        pattern = request.query_value("pattern") or ""
        if not requested or not pattern:
            raise bad_request("path and pattern are required")
        matcher = LineMatcher(pattern)
        root = self._context.resolve_path(requested)
        try:
            root_status = os.stat(root)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None
        if stat.S_ISDIR(root_status.st_mode):
            _require_listable(root, requested)
            files = _walk_files(root, requested)
        elif stat.S_ISREG(root_status.st_mode):
            files = iter([(root, os.path.normpath(requested))])
        else:
            files = iter(())
        matches = (
            {"file": shown, "line": line_number, "content": content}
            for absolute_path, shown in files
            for line_number, content in _matching_lines(absolute_path, matcher)
        )
        return stream_response(200, "application/json", _json_array(matches))

    # ----- /files/search --------------------------------------------------------------------------------

    def search_files(self, request: Request) -> Response:
        requested = request.query_value("path") or ""
        pattern = request.query_value("pattern") or ""
        if not requested or not pattern:
            raise bad_request("path and pattern are required")
        glob = compile_glob(pattern)
        match_relative_path = "/" in pattern
        root = self._context.resolve_path(requested)
        try:
            if not stat.S_ISDIR(os.stat(root).st_mode):
                raise DaemonError(400, f"not a directory: {requested}", INVALID_FILE_PATH)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None
        _require_listable(root, requested)

        def found() -> Iterator[str]:
            for relative, _is_dir in _walk_entries(root):
                subject = relative if match_relative_path else os.path.basename(relative)
                if glob.fullmatch(subject):
                    yield os.path.normpath(os.path.join(requested, relative))

        chunks = _json_object_with_array('{"files":', found())
        return stream_response(200, "application/json", chunks)

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
        old = pattern.encode("utf-8", "surrogatepass")
        new = new_value.encode("utf-8", "surrogatepass")
        results: list[dict[str, Any]] = []
        for requested in files:
            try:
                absolute_path = self._context.resolve_path(requested, allow_empty=False)
                count = replace_in_file(absolute_path, requested, old, new)
            except DaemonError as exc:
                results.append({"file": requested, "success": False, "error": exc.message})
                continue
            results.append({"file": requested, "success": True, "replacements": count})
        return json_response(200, results)


# ----- matching -------------------------------------------------------------------------------------------


class LineMatcher:
    """A line matches if it contains the pattern literally or the pattern (as a regex) finds a match."""

    def __init__(self, pattern: str) -> None:
        self.literal = pattern
        try:
            self.regex: re.Pattern[str] = re.compile(pattern)
        except re.error as exc:
            raise bad_request(
                f"invalid regular expression {pattern!r}: {exc}. The pattern is a regular expression "
                "(lines containing it literally match too); escape special characters such as "
                r"( ) [ ] { } * + ? | \ with a backslash, e.g. 'foo\(' to find 'foo('"
            ) from None

    def matches(self, line: str) -> bool:
        return self.literal in line or self.regex.search(line) is not None


def _matching_lines(absolute_path: str, matcher: LineMatcher) -> Iterator[tuple[int, str]]:
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
            yield from _scan_lines(source, matcher)
        except OSError:
            return


def _scan_lines(source: BinaryIO, matcher: LineMatcher) -> Iterator[tuple[int, str]]:
    line_number = 1
    while piece := source.readline(MAX_LINE_BYTES):
        complete = piece.endswith(b"\n")
        text = piece.decode("utf-8", "replace")
        if complete:
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        if matcher.matches(text):
            yield line_number, text[:MAX_REPORTED_LINE_CHARS]
        if complete:
            line_number += 1


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Translate a glob into a regex: `*` and `?` stay within one path segment, `**` spans segments,
    `[...]` is a character class (`[!...]` negated) and `{a,b}` an alternative."""
    try:
        return re.compile(_glob_to_regex(pattern, 0, len(pattern))[0], re.DOTALL)
    except (IndexError, re.error):
        return re.compile(re.escape(pattern), re.DOTALL)  # malformed glob: match it literally


def _glob_to_regex(pattern: str, index: int, end: int, in_braces: bool = False) -> tuple[str, int]:
    out: list[str] = []
    while index < end:
        char = pattern[index]
        if char == "*":
            if pattern.startswith("**", index):
                index += 2
                if pattern.startswith("/", index):
                    out.append("(?:.*/)?")  # `**/` also matches zero directories
                    index += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            closing = _class_end(pattern, index)
            if closing < 0:
                out.append(re.escape(char))
            else:
                body = pattern[index + 1 : closing]
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\")
                out.append(f"[{'^' if negate else ''}{body}]")
                index = closing
        elif char == "{" and _brace_end(pattern, index) > 0:
            alternatives: list[str] = []
            index += 1
            while True:
                alternative, index = _glob_to_regex(pattern, index, end, in_braces=True)
                alternatives.append(alternative)
                if pattern[index] == "}":
                    break
                index += 1  # the comma
            out.append("(?:" + "|".join(alternatives) + ")")
        elif in_braces and char in ",}":
            return "".join(out), index
        elif char == "\\" and index + 1 < end:
            index += 1
            out.append(re.escape(pattern[index]))
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out), index


def _class_end(pattern: str, start: int) -> int:
    index = start + 1
    if index < len(pattern) and pattern[index] in "!^":
        index += 1
    if index < len(pattern) and pattern[index] == "]":
        index += 1  # a leading `]` is literal
    closing = pattern.find("]", index)
    return closing


def _brace_end(pattern: str, start: int) -> int:
    depth = 0
    index = start
    while index < len(pattern):
        if pattern[index] == "\\":
            index += 2
            continue
        if pattern[index] == "{":
            depth += 1
        elif pattern[index] == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return -1


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


# ----- JSON streaming -------------------------------------------------------------------------------------


def _json_array(items: Iterator[Any]) -> Iterator[bytes]:
    yield from _batched(b"[", items, b"]")


def _json_object_with_array(prefix: str, items: Iterator[Any]) -> Iterator[bytes]:
    yield from _batched(prefix.encode() + b"[", items, b"]}")


def _batched(opening: bytes, items: Iterator[Any], closing: bytes) -> Iterator[bytes]:
    buffer = bytearray(opening)
    first = True
    for item in items:
        if not first:
            buffer += b","
        first = False
        buffer += encode_json(item)
        if len(buffer) >= _STREAM_BATCH_BYTES:
            yield bytes(buffer)
            buffer.clear()
    buffer += closing
    yield bytes(buffer)


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
            temp_fd, temp_path = _make_temp_near(target)
            with os.fdopen(temp_fd, "wb") as output:
                count = _stream_replace(source, output, old, new)
        if count:
            _install(temp_path, target, status)
    except OSError as exc:
        raise file_error_from_os_error(exc, requested, writing=True) from None
    finally:
        if temp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
    return count


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
    try:
        return tempfile.mkstemp(prefix=_REPLACE_TEMP_PREFIX, dir=os.path.dirname(target))
    except PermissionError:
        # The directory is read-only for us but the file may still be writable: spool elsewhere and
        # copy back in place.
        return tempfile.mkstemp(prefix=_REPLACE_TEMP_PREFIX)


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
