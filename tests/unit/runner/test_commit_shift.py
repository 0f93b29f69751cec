"""The layer's ownership shift around a commit (container_backend.shift_down / shift_up): the engine copies
the host's ids of the sandbox's user namespace as they are, so the runner gives the layer the sandbox's
own ids for the copy and the host's back after it, exactly (ids outside the namespace untouched, setuid
bits kept)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tidepool_runner.container_backend import shift_down, shift_up
from tidepool_runner.engine import RootIds

ROOT = RootIds(uid=300_000_000, gid=300_000_000)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other ids needs root")


def owner(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_uid, info.st_gid


def test_shift_down_gives_the_sandbox_ids_and_shift_up_restores_them(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "home" / "daytona").mkdir(parents=True)
    user_file = upper / "home" / "daytona" / "a.txt"
    user_file.write_text("x")
    tool = upper / "usr-bin-tool"
    tool.write_text("#!/bin/sh\n")
    link = upper / "home" / "daytona" / "link"
    link.symlink_to("/etc/passwd")  # never followed
    foreign = upper / "foreign"
    foreign.write_text("y")
    os.chown(upper, ROOT.uid, ROOT.gid)
    os.chown(upper / "home", ROOT.uid, ROOT.gid)
    os.chown(upper / "home" / "daytona", ROOT.uid + 1000, ROOT.gid + 1000)
    os.chown(user_file, ROOT.uid + 1000, ROOT.gid + 1000)
    os.chown(tool, ROOT.uid, ROOT.gid)
    tool.chmod(0o4755)
    os.lchown(link, ROOT.uid + 1000, ROOT.gid + 1000)
    os.chown(foreign, 1234, 1234)  # not the sandbox's: left alone both ways
    passwd_owner = owner(Path("/etc/passwd"))

    changed = shift_down(upper, ROOT)
    assert owner(upper) == (0, 0)
    assert owner(user_file) == (1000, 1000)
    assert owner(link) == (1000, 1000)
    assert owner(tool) == (0, 0) and tool.stat().st_mode & 0o7777 == 0o4755
    assert owner(foreign) == (1234, 1234)
    assert owner(Path("/etc/passwd")) == passwd_owner

    shift_up(changed, ROOT)
    assert owner(upper) == (ROOT.uid, ROOT.gid)
    assert owner(user_file) == (ROOT.uid + 1000, ROOT.gid + 1000)
    assert owner(link) == (ROOT.uid + 1000, ROOT.gid + 1000)
    assert owner(tool) == (ROOT.uid, ROOT.gid) and tool.stat().st_mode & 0o7777 == 0o4755
    assert owner(foreign) == (1234, 1234)


def test_a_missing_layer_changes_nothing(tmp_path: Path) -> None:
    assert shift_down(tmp_path / "absent", ROOT) == []
