"""File-system endpoints that do not move file contents: list, info, create folder, delete, move and
permissions. (Content search and replace live in `search.py`, transfers in `transfer.py`.)"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

from ..context import DaemonContext
from ..errors import (
    FILE_ACCESS_DENIED,
    INVALID_FILE_PATH,
    OUTPUT_LIMIT_EXCEEDED,
    DaemonError,
    bad_request,
    file_error_from_os_error,
)
from ..httpd.http_io import Request, Response, empty_response, encode_json, json_response

DEFAULT_FOLDER_MODE = "755"
CONFLICT = "CONFLICT"
# Listings up to this many entries are made in the daemon itself; larger ones in a bounded child.
IN_PROCESS_LIST_ENTRIES = 5_000
# Guards against a runaway `depth` walking an entire disk into one response (answered 422).
MAX_LIST_ENTRIES = 2_000_000


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


class _TooManyEntries(Exception):
    pass


def iter_entries(directory: str, depth: int, limit: int) -> Iterator[dict[str, Any]]:
    """The file infos below `directory` (sorted by name, depth-first, `depth` levels); raises
    _TooManyEntries once more than `limit` are found. Only one folder's names are held at a time.

    Raises OSError when `directory` itself cannot be listed; deeper unreadable folders are skipped.
    """
    count = 0

    def walk(folder: str, levels: int) -> Iterator[dict[str, Any]]:
        nonlocal count
        names: list[str] = []
        with os.scandir(folder) as iterator:
            for entry in iterator:
                names.append(entry.name)
                if count + len(names) > limit:
                    raise _TooManyEntries
        names.sort()
        for name in names:
            path = os.path.join(folder, name)
            try:
                status = stat_entry(path)
            except OSError:
                continue  # vanished between listing and stat
            count += 1
            yield file_info(path, status)
            # Recurse into real directories only: following symlinked dirs could loop forever.
            if levels > 1 and stat.S_ISDIR(status.st_mode) and not os.path.islink(path):
                try:
                    yield from walk(path, levels - 1)
                except PermissionError:
                    continue  # an unreadable subdirectory should not fail the whole listing

    return walk(directory, depth)


def list_job(params: dict[str, Any], out: BinaryIO) -> None:
    """The bounded child's listing (see process/bounded_job.py): `params` directory (absolute), requested,
    depth."""
    requested = params["requested"]
    try:
        entries = iter_entries(params["directory"], int(params["depth"]), MAX_LIST_ENTRIES)
        out.write(b"[")
        first = True
        for entry in entries:
            out.write(encode_json(entry) if first else b"," + encode_json(entry))
            first = False
        out.write(b"]")
    except OSError as exc:
        raise file_error_from_os_error(exc, requested) from None
    except _TooManyEntries:
        raise DaemonError(
            422,
            f"list: more than {MAX_LIST_ENTRIES} entries (the listing bound); list a smaller folder or use "
            "a smaller depth",
            OUTPUT_LIMIT_EXCEEDED,
        ) from None


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
        """Sorted by name, depth-first. Small listings are made right here; one that turns out to have more
        than IN_PROCESS_LIST_ENTRIES entries is made again by a bounded child process (see
        process/bounded.py), so a folder of millions of entries can neither exhaust the daemon's memory nor
        hold it up."""
        requested = request.query_value("path") or ""
        depth = _parse_depth(request.query_value("depth"))
        directory = self._context.resolve_path(requested)
        try:
            if not stat.S_ISDIR(os.stat(directory).st_mode):
                raise DaemonError(400, f"not a directory: {requested}", INVALID_FILE_PATH)
            entries = list(iter_entries(directory, depth, IN_PROCESS_LIST_ENTRIES))
        except OSError as exc:
            raise file_error_from_os_error(exc, requested) from None
        except _TooManyEntries:
            # Imported here: the bounded child imports this module for list_job and must start fast.
            from ..process.bounded import run_bounded

            params = {"directory": directory, "requested": requested, "depth": depth}
            return run_bounded("list", params, what="list")
        return json_response(200, entries)

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

    def move_file(self, request: Request) -> Response:
        """Rename `source` to `destination` (any filesystem); never overwrites (409), like upstream."""
        source = request.query_value("source") or ""
        destination = request.query_value("destination") or ""
        if not source or not destination:
            raise bad_request("source and destination paths are required")
        source_path = self._context.resolve_path(source, allow_empty=False)
        destination_path = self._context.resolve_path(destination, allow_empty=False)
        try:
            os.lstat(source_path)
        except OSError as exc:
            raise file_error_from_os_error(exc, source) from None
        parent = os.path.dirname(destination_path)
        try:
            if not stat.S_ISDIR(os.stat(parent).st_mode):
                raise DaemonError(
                    400, f"destination parent is not a directory: {destination}", INVALID_FILE_PATH
                )
        except OSError as exc:
            raise _parent_error(exc, destination) from None
        if os.path.lexists(destination_path):
            raise DaemonError(409, f"destination already exists: {destination}", CONFLICT)
        if source_path == "/" or destination_path.startswith(source_path.rstrip("/") + "/"):
            raise DaemonError(400, f"cannot move {source} into itself", INVALID_FILE_PATH)
        try:
            try:
                os.rename(source_path, destination_path)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Another filesystem (e.g. a volume): copy, then remove the source.
                shutil.move(source_path, destination_path)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise DaemonError(409, f"destination already exists: {destination}", CONFLICT) from None
            raise file_error_from_os_error(exc, source, writing=True) from None
        return empty_response(200)

    def set_file_permissions(self, request: Request) -> Response:
        """chmod and/or chown one path; owner and group may be names or numeric ids."""
        requested = request.query_value("path") or ""
        if not requested:
            raise bad_request("path is required")
        absolute_path = self._context.resolve_path(requested, allow_empty=False)
        mode = _parse_mode(request.query_value("mode") or "")
        uid = _resolve_owner(request.query_value("owner") or "")
        gid = _resolve_group(request.query_value("group") or "")
        try:
            os.stat(absolute_path)
            if mode is not None:
                os.chmod(absolute_path, mode)
            if uid != -1 or gid != -1:
                os.chown(absolute_path, uid, gid)
        except OSError as exc:
            raise file_error_from_os_error(exc, requested, writing=True) from None
        return empty_response(200)


def _parent_error(exc: OSError, destination: str) -> DaemonError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return file_error_from_os_error(exc, os.path.dirname(destination) or destination)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DaemonError(403, f"access denied: {destination}: {exc.strerror}", FILE_ACCESS_DENIED)
    return file_error_from_os_error(exc, destination)


def _parse_mode(raw_mode: str) -> int | None:
    if not raw_mode:
        return None
    try:
        mode = int(raw_mode, 8)
    except ValueError:
        raise bad_request(f"invalid mode format {raw_mode!r}: expected octal digits such as 644") from None
    if not 0 <= mode <= 0o7777:
        raise bad_request(f"mode out of range: {raw_mode!r}")
    return mode


def _resolve_owner(raw_owner: str) -> int:
    if not raw_owner:
        return -1
    if raw_owner.isdigit():
        return int(raw_owner)
    try:
        return pwd.getpwnam(raw_owner).pw_uid
    except KeyError:
        raise bad_request(f"user not found: {raw_owner}") from None


def _resolve_group(raw_group: str) -> int:
    if not raw_group:
        return -1
    if raw_group.isdigit():
        return int(raw_group)
    try:
        return grp.getgrnam(raw_group).gr_gid
    except KeyError:
        raise bad_request(f"group not found: {raw_group}") from None
