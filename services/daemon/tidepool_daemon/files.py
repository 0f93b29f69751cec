"""File-system endpoints that do not move file contents: list, info, create folder, delete."""

from __future__ import annotations

import os
import shutil
import stat
from datetime import UTC, datetime
from typing import Any

from .context import DaemonContext
from .errors import INVALID_FILE_PATH, DaemonError, bad_request, file_error_from_os_error
from .http_io import Request, Response, empty_response, json_response

DEFAULT_FOLDER_MODE = "755"
# Guards against a runaway `depth` walking an entire disk into one response.
MAX_LIST_ENTRIES = 100_000


def go_style_mod_time(moment: datetime, nanoseconds: int) -> str:
    """Go's `time.Time.String()` layout, which the SDK still exposes as the deprecated `modTime`."""
    fraction = f"{nanoseconds:09d}".rstrip("0")
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (f".{fraction}" if fraction else "") + " +0000 UTC"


def file_info(absolute_path: str, status: os.stat_result) -> dict[str, Any]:
    modified = datetime.fromtimestamp(status.st_mtime_ns // 1_000_000_000, UTC)
    nanoseconds = status.st_mtime_ns % 1_000_000_000
    modified_precise = modified.replace(microsecond=nanoseconds // 1000)
    return {
        "name": os.path.basename(absolute_path) or absolute_path,
        "isDir": stat.S_ISDIR(status.st_mode),
        "size": int(status.st_size),
        "mode": stat.filemode(status.st_mode),
        "modTime": go_style_mod_time(modified, nanoseconds),
        "modifiedAt": modified_precise.isoformat().replace("+00:00", "Z"),
        "permissions": f"{stat.S_IMODE(status.st_mode):04o}",
        "owner": str(status.st_uid),
        "group": str(status.st_gid),
        "path": absolute_path,
    }


def stat_entry(absolute_path: str) -> os.stat_result:
    """Stat following symlinks, but still describe a dangling symlink instead of calling it missing."""
    try:
        return os.stat(absolute_path)
    except FileNotFoundError:
        return os.lstat(absolute_path)


def _parse_depth(raw_depth: str | None) -> int:
    if raw_depth is None or raw_depth == "":
        return 1
    try:
        depth = int(raw_depth)
    except ValueError:
        raise bad_request(f"depth must be an integer, got {raw_depth!r}") from None
    if depth < 1:
        raise bad_request("depth must be at least 1")
    return depth


class FileSystemService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    def list_files(self, request: Request) -> Response:
        requested = request.query_value("path") or ""
        depth = _parse_depth(request.query_value("depth"))
        directory = self._context.resolve_path(requested)
        try:
            if not stat.S_ISDIR(os.stat(directory).st_mode):
                raise DaemonError(400, f"not a directory: {requested}", INVALID_FILE_PATH)
            entries: list[dict[str, Any]] = []
            self._collect_entries(directory, depth, entries)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None
        return json_response(200, entries)

    def _collect_entries(self, directory: str, depth: int, into: list[dict[str, Any]]) -> None:
        with os.scandir(directory) as iterator:
            children = sorted(iterator, key=lambda entry: entry.name)
        for child in children:
            try:
                status = stat_entry(child.path)
            except OSError:
                continue  # vanished between listing and stat
            into.append(file_info(child.path, status))
            if len(into) > MAX_LIST_ENTRIES:
                raise bad_request(f"listing exceeds {MAX_LIST_ENTRIES} entries; use a smaller depth")
            # Recurse into real directories only: following symlinked dirs could loop forever.
            if depth > 1 and child.is_dir(follow_symlinks=False):
                try:
                    self._collect_entries(child.path, depth - 1, into)
                except PermissionError:
                    continue  # an unreadable subdirectory should not fail the whole listing

    def get_file_info(self, request: Request) -> Response:
        requested = request.require_query("path")
        absolute_path = self._context.resolve_path(requested)
        try:
            status = stat_entry(absolute_path)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None
        return json_response(200, file_info(absolute_path, status))

    def create_folder(self, request: Request) -> Response:
        requested = request.require_query("path")
        absolute_path = self._context.resolve_path(requested, allow_empty=False)
        raw_mode = request.query_value("mode") or DEFAULT_FOLDER_MODE
        try:
            mode = int(raw_mode, 8)
        except ValueError:
            raise bad_request(f"mode must be an octal string such as 755, got {raw_mode!r}") from None
        if not 0 <= mode <= 0o7777:
            raise bad_request(f"mode out of range: {raw_mode!r}")
        try:
            # Like Go's MkdirAll: parents are created and an existing directory is not an error.
            os.makedirs(absolute_path, mode=mode, exist_ok=True)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested, writing=True) from None
        return empty_response(201)

    def delete_file(self, request: Request) -> Response:
        requested = request.require_query("path")
        recursive = (request.query_value("recursive") or "").lower() in ("true", "1")
        absolute_path = self._context.resolve_path(requested, allow_empty=False)
        if absolute_path == "/":
            raise DaemonError(400, "refusing to delete the root directory", INVALID_FILE_PATH)
        try:
            # lstat: a symlink is removed itself, never the tree it points to.
            status = os.lstat(absolute_path)
            if stat.S_ISDIR(status.st_mode):
                if not recursive:
                    raise DaemonError(
                        400, f"cannot delete directory without recursive flag: {requested}", INVALID_FILE_PATH
                    )
                shutil.rmtree(absolute_path)
            else:
                os.unlink(absolute_path)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested, writing=True) from None
        return empty_response(204)
