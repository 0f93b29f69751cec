"""Images without /etc, /etc/passwd or /etc/group get root-owned ones before the first start (issue #15)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tidepool_runner.account_files import add_missing_account_files

SANDBOX_ROOT = (231072, 231072)  # the host ids of the sandbox's root
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="gives files to another owner (needs root)")


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


@needs_root
def test_a_scratch_image_gets_etc_and_empty_account_files_of_the_sandboxs_root(tmp_path: Path) -> None:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    (lower / "bin").mkdir(parents=True)
    created = add_missing_account_files(upper, [str(lower)], *SANDBOX_ROOT)
    assert created == ["etc", "etc/passwd", "etc/group"]
    assert owner_and_mode(upper / "etc") == (*SANDBOX_ROOT, 0o755)
    for name in ("passwd", "group"):
        assert owner_and_mode(upper / "etc" / name) == (*SANDBOX_ROOT, 0o644)
        assert (upper / "etc" / name).read_bytes() == b""
    assert add_missing_account_files(upper, [str(lower)], *SANDBOX_ROOT) == [], "the next start keeps them"


@needs_root
def test_an_image_with_its_own_etc_is_left_alone(tmp_path: Path) -> None:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "group").write_text("root:x:0:\n")
    assert add_missing_account_files(upper, [str(lower)], *SANDBOX_ROOT) == []
    assert list(upper.iterdir()) == []


def test_nothing_is_made_when_the_images_layers_are_unknown(tmp_path: Path) -> None:
    """An empty /etc/passwd in the writable layer would hide the image's own one."""
    assert add_missing_account_files(tmp_path, [], *SANDBOX_ROOT) == []
    assert list(tmp_path.iterdir()) == []
