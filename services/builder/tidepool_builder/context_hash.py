"""Does a context archive hold what its hash says? The SDK's hash, recomputed from the archive.

The SDK (`ObjectStorage._compute_hash_for_path_md5`, daytona 0.226.1) names each upload by
`md5(archive_path + content)` for a file, and for a directory by
`md5(archive_path + for each os.walk step: [relative dir if it is an empty leaf] + for each file:
relative path + content)`. Symlinks are followed for content (a link to a file counts as that file; a
link to a directory is listed but not entered).

A file's hash is recomputed exactly. A directory's depends on the order in which `os.walk` listed it, which
is the file system's (ext4: name-hash order) and is not in the archive (tar lists names sorted). So the
orders are searched, sorted first, and the search shares prefixes (MD5 states are copied): small trees
are decided either way; for trees with too many possible orders the answer is UNDECIDED, never a false
mismatch. (A directory's bytes come from the organization's own object-storage directory, and build
refs are per organization, so an undecided hash can only affect that organization's own builds.)
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from enum import StrEnum

from tidepool_builder.context_store import ContextArchive, _resolve_link

MAX_ORDERINGS = 5040  # complete walk orders tried (7!) before calling a directory undecided
MAX_HASHED_BYTES = 256 * 1024 * 1024  # beyond the first pass


class HashCheck(StrEnum):
    VERIFIED = "verified"
    MISMATCH = "mismatch"
    UNDECIDED = "undecided"


@dataclass(frozen=True)
class _Entry:
    name: str
    path: str  # from the archive root
    content: bytes | None = None  # files (and links to files)
    is_dir: bool = False  # real directories and links to directories
    walked: bool = False  # real directories: os.walk enters them


class _Undecidable(Exception):
    pass


def _md5(data: bytes = b"") -> hashlib._Hash:
    return hashlib.md5(data, usedforsecurity=False)


def _tree(archive: ContextArchive, base: str) -> dict[str, list[_Entry]]:
    """Children of every directory under `base` (included), as os.walk would classify them."""
    directories = set(archive.directories)
    for path in [*archive.files, *archive.symlinks]:
        parent = posixpath.dirname(path)
        while parent and parent not in directories:
            directories.add(parent)
            parent = posixpath.dirname(parent)
    children: dict[str, list[_Entry]] = {path: [] for path in directories if _under(path, base)}
    for path in directories:
        if path != base and _under(path, base):
            children[posixpath.dirname(path)].append(_Entry(posixpath.basename(path), path, None, True, True))
    for path, content in archive.files.items():
        if path != base and _under(path, base):
            children[posixpath.dirname(path)].append(_Entry(posixpath.basename(path), path, content))
    for path in archive.symlinks:
        if path == base or not _under(path, base):
            continue
        target = _resolve_link(archive.symlinks, path)
        name = posixpath.basename(path)
        if target is not None and target in archive.files:
            children[posixpath.dirname(path)].append(_Entry(name, path, archive.files[target]))
        elif target is not None and target in directories:
            children[posixpath.dirname(path)].append(_Entry(name, path, None, True, False))
        else:
            # The SDK read this link's target from the user's disk: the archive cannot tell its content.
            raise _Undecidable(path)
    for entries in children.values():
        entries.sort(key=lambda entry: entry.name)
    return children


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base + "/")


def check_context_hash(archive: ContextArchive, claimed: str) -> HashCheck:
    """VERIFIED when the archive's content has the SDK hash `claimed`, MISMATCH when no order can give it."""
    if not archive.order:
        return HashCheck.MISMATCH
    base = archive.order[0]
    if base in archive.files:  # a file context: one regular file named by its archive path
        if len(archive.order) != 1:
            return HashCheck.MISMATCH
        digest = _md5(base.encode())
        digest.update(archive.files[base])
        return HashCheck.VERIFIED if digest.hexdigest() == claimed else HashCheck.MISMATCH
    if base not in archive.directories:
        return HashCheck.UNDECIDED  # e.g. the source was a symlink: the SDK hashed its target
    try:
        children = _tree(archive, base)
    except _Undecidable:
        return HashCheck.UNDECIDED
    return _search(children, base, claimed)


def _relative(path: str, base: str) -> str:
    return "." if path == base else path[len(base) + 1 :]


Frame = tuple[str, tuple[_Entry, ...], tuple[_Entry, ...]]


def _search(children: dict[str, list[_Entry]], base: str, claimed: str) -> HashCheck:
    """Depth-first over os.walk orders (sorted first), with MD5 states shared between common prefixes.

    A frame is one directory being walked: (path, files not hashed yet, subdirectories not walked yet).
    Choices are expanded lazily, so the first (sorted) order costs one pass over the content.
    """

    def frame(path: str) -> Frame:
        entries = children[path]
        files = tuple(entry for entry in entries if not entry.is_dir)
        walked = tuple(entry for entry in entries if entry.walked)
        return path, files, walked

    def enter(digest: hashlib._Hash, path: str) -> None:
        if not children[path]:  # an empty leaf: os.walk yields it with no dirs and no files
            digest.update(_relative(path, base).encode())

    start = _md5(base.encode())
    enter(start, base)
    # (digest so far, frames, index of the next choice to try at this node)
    stack: list[tuple[hashlib._Hash, tuple[Frame, ...], int]] = [(start, (frame(base),), 0)]
    orderings = 0
    hashed = 0
    while stack:
        digest, frames, choice = stack.pop()
        if not frames:
            if digest.hexdigest() == claimed:
                return HashCheck.VERIFIED
            orderings += 1
            if orderings >= MAX_ORDERINGS:
                return HashCheck.UNDECIDED
            continue
        path, files, walked = frames[-1]
        if files:
            if choice + 1 < len(files):
                stack.append((digest, frames, choice + 1))
            entry = files[choice]
            branch = digest.copy() if choice + 1 < len(files) else digest
            branch.update(_relative(entry.path, base).encode())
            branch.update(entry.content or b"")
            if orderings:
                hashed += len(entry.content or b"")
                if hashed > MAX_HASHED_BYTES:
                    return HashCheck.UNDECIDED
            rest = files[:choice] + files[choice + 1 :]
            stack.append((branch, (*frames[:-1], (path, rest, walked)), 0))
        elif walked:
            if choice + 1 < len(walked):
                stack.append((digest, frames, choice + 1))
            entry = walked[choice]
            branch = digest.copy() if choice + 1 < len(walked) else digest
            enter(branch, entry.path)
            rest = walked[:choice] + walked[choice + 1 :]
            stack.append((branch, (*frames[:-1], (path, files, rest), frame(entry.path)), 0))
        else:
            stack.append((digest, frames[:-1], 0))
    return HashCheck.MISMATCH
