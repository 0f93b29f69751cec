"""Sandbox disks on real loop devices: the writable layer's dirs become links onto a filesystem of the
sandbox's size; ready disks from the pool are claimed without formatting on the create path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidepool_runner.disks import INITIALIZED_MARKER, SandboxDisks

GIB = 1024**3


@pytest.fixture
def disks(short_tmp: Path) -> Iterator[SandboxDisks]:
    made = SandboxDisks(short_tmp / "disks", default_size_gib=1)
    yield made
    for sandbox_id in made.disk_ids():
        made.remove(sandbox_id)
    made.discard_pool()


def layer(root: Path, name: str, content: bool = False) -> tuple[Path, Path]:
    upper, work = root / name / "diff", root / name / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    os.chown(upper, 268_500_000, 268_500_000)
    if content:
        (upper / "etc").mkdir()
        (upper / "etc" / "engine-made").write_text("kept")
    return upper, work


def test_attach_puts_the_layer_on_a_disk_of_its_size(disks: SandboxDisks, short_tmp: Path) -> None:
    upper, work = layer(short_tmp, "layer-a", content=True)
    disks.attach("sbx-a", 1, str(upper), str(work))
    paths = disks.paths("sbx-a")
    assert os.path.ismount(paths.mount)
    assert upper.is_symlink() and upper.resolve() == paths.upper
    assert work.is_symlink() and work.resolve() == paths.work
    assert (upper / "etc" / "engine-made").read_text() == "kept"  # the engine's content moved along
    assert paths.upper.stat().st_uid == 268_500_000  # owner kept: the sandbox's root
    info = os.statvfs(paths.upper)
    assert 0.9 * GIB <= info.f_blocks * info.f_frsize <= GIB
    # Attaching again (a redelivered job, a restart) changes nothing and copies nothing again.
    (paths.upper / "new-file").write_text("x")
    disks.attach("sbx-a", 1, str(upper), str(work))
    assert (upper / "new-file").read_text() == "x"
    assert (paths.mount / INITIALIZED_MARKER).exists()
    with pytest.raises(OSError) as full, open(upper / "too-big", "wb") as handle:
        handle.truncate(0)
        os.posix_fallocate(handle.fileno(), 0, 2 * GIB)
    assert full.value.errno == 28  # ENOSPC at the sandbox's own limit
    disks.remove("sbx-a")
    assert not os.path.ismount(paths.mount) and not paths.image.exists()


def test_a_ready_disk_is_claimed_and_the_pool_refilled(disks: SandboxDisks, short_tmp: Path) -> None:
    assert disks.refill_pool() == 2
    pool = short_tmp / "disks" / "pool"
    for folder in (pool.parent, pool):  # root-only: the images hold every sandbox's files
        assert folder.stat().st_mode & 0o777 == 0o700
    ready_before = sorted(pool.glob("*.img"))
    assert len(ready_before) == 2
    upper, work = layer(short_tmp, "layer-b")
    disks.attach("sbx-b", 1, str(upper), str(work))
    ready_after = sorted(pool.glob("*.img"))
    assert len(ready_after) == 1  # one was taken, not formatted anew
    assert os.path.ismount(disks.paths("sbx-b").mount)
    assert disks.refill_pool() == 1
    # A size nobody asked for lately gets no ready disks; its own create formats one.
    upper, work = layer(short_tmp, "layer-c")
    disks.attach("sbx-c", 2, str(upper), str(work))
    assert len(sorted(pool.glob("*.img"))) == 2
    disks.discard_pool()
    assert not list(pool.glob("*.img")) and not [p for p in pool.iterdir() if os.path.ismount(p)]


def test_a_disk_grows_when_resized_and_an_interrupted_grow_is_finished(
    disks: SandboxDisks, short_tmp: Path
) -> None:
    upper, work = layer(short_tmp, "layer-g", content=True)
    disks.attach("sbx-g", 1, str(upper), str(work))
    paths = disks.paths("sbx-g")
    (paths.upper / "data").write_text("kept")

    def size() -> float:
        info = os.statvfs(paths.upper)
        return info.f_blocks * info.f_frsize / GIB

    disks.attach("sbx-g", 2, str(upper), str(work))  # stopped, resized to 2 GiB, started
    assert 1.8 <= size() <= 2 and (paths.upper / "data").read_text() == "kept"
    # A grow that stopped after the file but before its filesystem: the next attach finishes it.
    with open(paths.image, "r+b") as image:
        image.truncate(3 * GIB)
    disks.attach("sbx-g", 3, str(upper), str(work))
    assert 2.7 <= size() <= 3 and (paths.upper / "data").read_text() == "kept"
