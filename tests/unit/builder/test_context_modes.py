"""Dockerfile COPY keeps the file modes of the SDK's uploaded context (issue #15), as Docker does."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from tidepool_builder.builds import read_context, read_context_modes
from tidepool_builder.context_store import merge_archives, merge_modes, parse_context_archive
from tidepool_builder.docker_build import build_context_tar


def sdk_upload(source: Path, archive_path: str) -> io.BytesIO:
    """The tar the official SDK uploads for `add_local_dir` (daytona ObjectStorage: `tar.add`)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as archive:
        archive.add(str(source), arcname=archive_path)
    buffer.seek(0)
    return buffer


def built_modes(context_tar: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(context_tar)) as archive:
        return {member.name: member.mode for member in archive.getmembers()}


def test_copy_keeps_the_executable_bits_of_the_uploaded_context(tmp_path: Path) -> None:
    source = tmp_path / "ctx"
    source.mkdir()
    (source / "busybox").write_bytes(b"\x7fELF...")
    (source / "busybox").chmod(0o755)
    (source / "notes.txt").write_text("plain\n")
    (source / "notes.txt").chmod(0o640)
    (source / "setuid-tool").write_bytes(b"x")
    (source / "setuid-tool").chmod(0o4755)
    (source / "sh").symlink_to("busybox")

    archives = [parse_context_archive(sdk_upload(source, "ctx"), "hash")]
    files, modes = merge_archives(archives), merge_modes(archives)
    context_tar = build_context_tar("FROM scratch\nCOPY ctx/busybox /bin/busybox\n", files, None, modes)

    built = built_modes(context_tar)
    assert built["ctx/busybox"] == 0o755
    assert built["ctx/sh"] == 0o755, "a link's file has its target's mode"
    assert built["ctx/notes.txt"] == 0o640
    assert built["ctx/setuid-tool"] == 0o755, "no set-id bits from a user's archive"
    assert built["Dockerfile"] == 0o644


def test_a_local_context_keeps_its_modes_too(tmp_path: Path) -> None:
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o750)
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    context_tar = build_context_tar(
        "FROM scratch\n", read_context(str(tmp_path)), None, read_context_modes(str(tmp_path))
    )
    assert built_modes(context_tar)["run.sh"] == 0o750
