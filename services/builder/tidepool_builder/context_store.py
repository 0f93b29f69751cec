"""Declarative-build context from object storage: the SDK's `{organizationId}/{hash}/context.tar` uploads.

The SDK tars each local source (`add_local_file`, `add_local_dir`, requirements files, ...) under its
archive path (the local path without its leading `/`) and lists the hashes in `buildInfo.contextHashes`.
The builder downloads every tar and merges them into one `{relative_path: bytes}` build context, as
Daytona's runner merges them into one tar.

The archives come from users, so they are read, never extracted to disk, and anything that could escape
the context is refused: absolute paths, `..` components, links pointing outside the archive's root
(or absolute), device files and FIFOs. Links that stay inside are resolved to the content they point to
(the map holds regular files only); dangling links are dropped. File permission bits are kept beside the
map (`context_modes`: COPY keeps them, as Docker does; set-id bits are not kept).
"""

from __future__ import annotations

import asyncio
import posixpath
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, NoReturn, TypeVar
from urllib.parse import urlsplit

import urllib3
import urllib3.exceptions
from minio import Minio
from minio.error import InvalidResponseError, S3Error

from tidepool_runtime.object_keys import service_key

# The builder reads only its own concerns (runtime settings.py); `Settings` here means those.
from tidepool_runtime.settings import BuilderSettings as Settings

CONTEXT_OBJECT = "context.tar"
MAX_LINK_DEPTH = 40  # symlink chains, as the kernel's MAXSYMLINKS
# What of a member's mode COPY keeps: read/write/execute for owner, group, others (no set-id, no sticky:
# the archive comes from a user). A file without a mode in the map gets DEFAULT_FILE_MODE.
PERMISSION_BITS = 0o777
Value = TypeVar("Value")  # a map over the context's files: their content or their mode
DEFAULT_FILE_MODE = 0o644


class ContextError(Exception):
    """A build context could not be fetched or is unsafe; the message names the context hash."""


class ContextNotFoundError(ContextError):
    pass


class UnsafeContextError(ContextError):
    pass


def context_key(organization_id: str, context_hash: str) -> str:
    return f"{organization_id}/{context_hash}/{CONTEXT_OBJECT}"


def make_client(settings: Settings, organization_id: str) -> Minio:
    parts = urlsplit(settings.s3_endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        endpoint = settings.s3_endpoint
        raise ContextError(f"TIDEPOOL_S3_ENDPOINT must be http(s)://host[:port], not {endpoint!r}")
    # Verification is never turned off: the CA of a private endpoint comes from TIDEPOOL_S3_CA_FILE,
    # otherwise the system trust store (which honours SSL_CERT_FILE) is used.
    http_client = urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED",
        ca_certs=settings.s3_ca_file or None,
        timeout=urllib3.Timeout(connect=10, read=120),
        retries=urllib3.Retry(total=3, backoff_factor=0.3, status_forcelist=(500, 502, 503, 504)),
        maxsize=4,
    )
    # A service key scoped to this organization's root only (the gateway holds the storage's own key).
    access_key, secret_key = service_key(settings.s3_secret_key, organization_id)
    return Minio(
        parts.netloc,
        access_key=access_key,
        secret_key=secret_key,
        secure=parts.scheme == "https",
        region=settings.s3_region,  # no GetBucketLocation round trip (rclone does not implement it)
        http_client=http_client,
    )


def _is_missing(error: Exception) -> bool:
    if isinstance(error, S3Error):
        return error.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject")
    # minio-py insists on `application/xml` error bodies; rclone answers `text/xml`.
    return isinstance(error, InvalidResponseError) and getattr(error, "_code", None) == 404


def _member_path(name: str, context_hash: str, what: str = "path") -> str:
    """The normalised relative path of an archive member, or UnsafeContextError."""
    if name.startswith("/") or name.startswith("\\"):
        raise UnsafeContextError(f"context {context_hash}: absolute {what} {name!r} in the archive")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeContextError(f"context {context_hash}: {what} {name!r} leaves the context ('..')")
    return "/".join(parts)


@dataclass
class ContextArchive:
    """One context tar as read: its members in archive order, before symlinks are resolved."""

    order: list[str] = field(default_factory=list)  # every member path, first one first
    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)  # path -> permission bits (0o777 at most)
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> normalised target, both from the root
    directories: set[str] = field(default_factory=set)


def parse_context_archive(stream: IO[bytes], context_hash: str) -> ContextArchive:
    """The members of one context tar (streamed, any compression), after the safety checks."""
    contents = ContextArchive()
    files, symlinks = contents.files, contents.symlinks
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                path = _member_path(member.name, context_hash)
                if member.isdir():
                    contents.directories.add(path)
                    contents.order.append(path)
                    continue
                if not path:
                    raise UnsafeContextError(f"context {context_hash}: a non-directory member names the root")
                contents.order.append(path)
                if member.isreg():
                    extracted = archive.extractfile(member)
                    if extracted is None:
                        raise UnsafeContextError(f"context {context_hash}: unreadable member {member.name!r}")
                    files[path] = extracted.read()
                    contents.modes[path] = member.mode & PERMISSION_BITS
                elif member.issym():
                    link = f"symlink {member.name!r} -> {member.linkname!r}"
                    if member.linkname.startswith("/"):
                        raise UnsafeContextError(f"context {context_hash}: {link} is absolute")
                    target = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname))
                    if target == ".." or target.startswith("../"):
                        raise UnsafeContextError(f"context {context_hash}: {link} points outside the context")
                    symlinks[path] = target
                elif member.islnk():
                    target = _member_path(member.linkname, context_hash, "hard link target")
                    if target in files:
                        files[path] = files[target]
                        contents.modes[path] = contents.modes[target]
                    elif target in symlinks:
                        symlinks[path] = symlinks[target]
                    else:
                        raise UnsafeContextError(
                            f"context {context_hash}: hard link {member.name!r} -> {member.linkname!r} "
                            "does not name an earlier file of the archive"
                        )
                else:
                    raise UnsafeContextError(
                        f"context {context_hash}: {member.name!r} is a device, FIFO or other special file"
                    )
    except tarfile.TarError as error:
        raise ContextError(f"context {context_hash}: not a valid tar archive: {error}") from error
    return contents


def read_context_archive(stream: IO[bytes], context_hash: str) -> dict[str, bytes]:
    """The regular files of one context tar (streamed, any compression), after the safety checks."""
    contents = parse_context_archive(stream, context_hash)
    _resolve_symlinks(contents.files, contents.symlinks)
    return contents.files


def _resolve_link(symlinks: Mapping[str, str], path: str, depth: int = 0) -> str | None:
    """Where `path` leads once every symlink on it is followed (textually), or None for a loop."""
    if depth > MAX_LINK_DEPTH:
        return None
    parts = [] if path == "." else path.split("/")
    # The longest prefix that is a link is followed first (a link to a directory may sit mid-path).
    for index in range(len(parts), 0, -1):
        prefix = "/".join(parts[:index])
        if prefix in symlinks:
            followed = posixpath.normpath(posixpath.join(symlinks[prefix], *parts[index:]))
            return _resolve_link(symlinks, followed, depth + 1)
    return path


def _resolve_symlinks(files: dict[str, Value], symlinks: Mapping[str, str]) -> None:
    """Give in-root symlinks the content they point to: a file, or every file under a directory.

    Resolution is textual, within the archive's own members: nothing on the builder's disk is read.
    """
    for link in symlinks:
        target = _resolve_link(symlinks, link)
        if target is None or target == ".." or target.startswith("../"):
            continue
        if target in files:
            files.setdefault(link, files[target])
            continue
        prefix = "" if target == "." else f"{target}/"
        for path in [path for path in files if path.startswith(prefix)]:
            files.setdefault(f"{link}/{path[len(prefix) :]}", files[path])
        # Otherwise dangling (or a link to an empty directory): nothing to copy.


# An object the SDK just wrote may take a moment to appear to another key (the embedded server lists
# directories per key, refreshed every 100 ms): look again briefly before calling it missing.
MISSING_RETRIES = 3
MISSING_RETRY_SECONDS = 0.3


def _fetch_one(client: Minio, bucket: str, organization_id: str, context_hash: str) -> ContextArchive:
    key = context_key(organization_id, context_hash)
    for attempt in range(MISSING_RETRIES + 1):
        try:
            response = client.get_object(bucket, key)
            break
        except (S3Error, InvalidResponseError, urllib3.exceptions.HTTPError) as error:
            if _is_missing(error) and attempt < MISSING_RETRIES:
                time.sleep(MISSING_RETRY_SECONDS)
                continue
            _raise_fetch_error(error, bucket, key, context_hash)
    try:
        return parse_context_archive(response, context_hash)
    except urllib3.exceptions.HTTPError as error:  # the connection broke mid-download
        raise ContextError(f"downloading build context {context_hash}: {error}") from error
    finally:
        response.close()
        response.release_conn()


def _raise_fetch_error(error: Exception, bucket: str, key: str, context_hash: str) -> NoReturn:
    if _is_missing(error):
        raise ContextNotFoundError(
            f"build context {context_hash} not found in object storage (s3://{bucket}/{key}); "
            "the SDK uploads it before creating the snapshot"
        ) from error
    message = f"downloading build context {context_hash} (s3://{bucket}/{key}): {error}"
    raise ContextError(message) from error


def fetch_archives_sync(settings: Settings, organization_id: str, hashes: list[str]) -> list[ContextArchive]:
    if not (settings.s3_endpoint and settings.s3_secret_key):
        raise ContextError("object storage is not configured (TIDEPOOL_S3_ENDPOINT, TIDEPOOL_S3_SECRET_KEY)")
    if not organization_id:
        raise ContextError("a build with context hashes needs the organization that uploaded them")
    client = make_client(settings, organization_id)
    archives: list[ContextArchive] = []
    for context_hash in hashes:
        # A hash becomes part of an object key: refuse anything but a plain name.
        if not context_hash or "/" in context_hash or context_hash in (".", ".."):
            raise ContextError(f"invalid build context hash {context_hash!r}")
        archives.append(_fetch_one(client, settings.s3_bucket, organization_id, context_hash))
    return archives


def merge_archives(archives: list[ContextArchive]) -> dict[str, bytes]:
    """One build context from several archives; a later archive wins, as in one merged tar."""
    merged: dict[str, bytes] = {}
    for archive in archives:
        files = dict(archive.files)
        _resolve_symlinks(files, archive.symlinks)
        merged.update(files)
    return merged


def merge_modes(archives: list[ContextArchive]) -> dict[str, int]:
    """The permission bits of merge_archives()'s files, path -> mode (a link's file has its target's)."""
    merged: dict[str, int] = {}
    for archive in archives:
        modes = {path: archive.modes.get(path, DEFAULT_FILE_MODE) for path in archive.files}
        _resolve_symlinks(modes, archive.symlinks)
        merged.update(modes)
    return merged


async def fetch_archives(settings: Settings, organization_id: str, hashes: list[str]) -> list[ContextArchive]:
    """Download and parse `{organization_id}/{hash}/context.tar` for every hash, in order.

    Raises ContextNotFoundError (naming the hash) for a missing object and UnsafeContextError for an
    archive that tries to escape the context. The blocking S3 client runs in a worker thread.
    """
    if not hashes:
        return []
    return await asyncio.to_thread(fetch_archives_sync, settings, organization_id, list(hashes))


async def fetch_context(settings: Settings, organization_id: str, hashes: list[str]) -> dict[str, bytes]:
    """Every archive of `hashes` merged into one build context (see fetch_archives; no hash check)."""
    return merge_archives(await fetch_archives(settings, organization_id, hashes))
