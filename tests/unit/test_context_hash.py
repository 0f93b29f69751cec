"""The builder recomputes the SDK's context hash from the archive it downloads.

Hashes come from the official SDK's own function and archives are made the way its uploader makes them
(`tarfile.add(path, arcname=archive path)`), so a change on either side shows here.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

import pytest
from daytona._async.object_storage import AsyncObjectStorage

from tidepool_builder import context_hash
from tidepool_builder.context_hash import HashCheck, check_context_hash
from tidepool_builder.context_store import ContextArchive, parse_context_archive


def sdk_hash(path: Path) -> tuple[str, str]:
    """(hash, archive path) exactly as `ObjectStorage.upload` computes them."""
    storage = object.__new__(AsyncObjectStorage)  # no S3 client needed for hashing
    archive_path = AsyncObjectStorage.compute_archive_base_path(str(path))
    return asyncio.run(storage._compute_hash_for_path_md5(str(path), archive_path)), archive_path


def sdk_archive(path: Path, archive_path: str) -> ContextArchive:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as archive:
        archive.add(str(path), arcname=archive_path)
    buffer.seek(0)
    return parse_context_archive(buffer, "test")


def test_a_file_context_is_checked_exactly(tmp_path: Path) -> None:
    source = tmp_path / "cfg.toml"
    source.write_bytes(b"token = 'mine'\n")
    claimed, archive_path = sdk_hash(source)
    assert check_context_hash(sdk_archive(source, archive_path), claimed) == HashCheck.VERIFIED

    # Another tenant's bytes uploaded under this hash (the attack): the hash names other content.
    forged = tmp_path / "forged" / "cfg.toml"
    forged.parent.mkdir()
    forged.write_bytes(b"token = 'theirs'\n")
    assert check_context_hash(sdk_archive(forged, archive_path), claimed) == HashCheck.MISMATCH
    assert check_context_hash(ContextArchive(), claimed) == HashCheck.MISMATCH


def make_tree(root: Path, names: list[str]) -> None:
    for name in names:
        target = root / name
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f"content of {name}\n".encode() + os.urandom(8))


def test_a_directory_context_is_checked_whatever_the_listing_order(tmp_path: Path) -> None:
    # Names created out of order: os.walk lists them in the file system's order, the tar sorted.
    root = tmp_path / "data"
    make_tree(root, ["zeta.txt", "alpha.txt", "mid.py", "b/2.txt", "b/1.txt", "a/x.bin", "empty/", "c/d/"])
    (root / "link-to-alpha").symlink_to("alpha.txt")
    (root / "link-to-dir").symlink_to("b")
    claimed, archive_path = sdk_hash(root)
    archive = sdk_archive(root, archive_path)
    assert check_context_hash(archive, claimed) == HashCheck.VERIFIED

    (root / "b" / "2.txt").write_bytes(b"changed after hashing")
    assert check_context_hash(sdk_archive(root, archive_path), claimed) == HashCheck.MISMATCH


def test_a_directory_with_too_many_orders_is_undecided_not_mismatched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "many"
    make_tree(root, [f"f{index:02}.txt" for index in range(9)])
    claimed, archive_path = sdk_hash(root)
    archive = sdk_archive(root, archive_path)
    monkeypatch.setattr(context_hash, "MAX_ORDERINGS", 1)
    verdict = check_context_hash(archive, claimed)
    # With one ordering allowed, only the sorted order is tried: verified if the file system listed them
    # sorted, otherwise undecided, but never a false mismatch.
    assert verdict in (HashCheck.VERIFIED, HashCheck.UNDECIDED)
    assert check_context_hash(archive, "0" * 32) == HashCheck.UNDECIDED


def test_a_link_to_content_outside_the_archive_is_undecided(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("read by the SDK from the user's disk, not in the archive\n")
    root = tmp_path / "linked"
    make_tree(root, ["a.txt"])
    (root / "out").symlink_to("../outside.txt")  # relative: absolute links are refused outright
    claimed, archive_path = sdk_hash(root)
    assert check_context_hash(sdk_archive(root, archive_path), claimed) == HashCheck.UNDECIDED
