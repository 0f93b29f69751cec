"""Issue #13: the runner's volume mounts are real FUSE mounts; what a restart finds is cleaned up (mounts of
sandboxes that no longer run, dead mounts) and live mounts of running sandboxes are kept. rclone mounts a
local folder here (the SDK tests mount the object storage)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.polling import wait_until
from tidepool_contracts.models import SandboxSpec, VolumeMountSpec
from tidepool_runner.container_config import build_container_config
from tidepool_runner.volumes import VolumeMounts, is_alive, mounted_points, rclone_binary
from tidepool_runtime.settings import RunnerSettings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE"
)


def fuse_mount(source: Path, point: Path) -> None:
    point.mkdir(parents=True, exist_ok=True)
    argv = [
        rclone_binary(),
        "mount",
        str(source),
        str(point),
        "--config",
        "/dev/null",
        "--daemon",
        "--allow-other",
    ]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def rclone_pid(point: Path) -> int:
    found = subprocess.run(["pgrep", "-f", f"rclone mount .* {point} "], capture_output=True, text=True)
    return int(found.stdout.split()[0])


def test_clean_stale_keeps_running_sandboxes_and_drops_the_rest(short_tmp: Path) -> None:
    settings = RunnerSettings(data_dir=short_tmp / "data")
    volumes = VolumeMounts(settings)
    source = short_tmp / "src"
    source.mkdir()
    (source / "f.txt").write_text("hello")
    running, stopped, dead = (volumes.mount_point(name, 0) for name in ("running", "stopped", "dead"))
    for point in (running, stopped, dead):
        fuse_mount(source, point)
    try:
        assert set(mounted_points(volumes.mounts_dir)) == {running, stopped, dead}
        os.kill(rclone_pid(dead), signal.SIGKILL)
        wait_until(lambda: not is_alive(dead), "a killed rclone must leave a dead mount")

        volumes.clean_stale({"running", "dead"})

        assert mounted_points(volumes.mounts_dir) == [running]
        assert (running / "f.txt").read_text() == "hello"
        assert not stopped.parent.exists()

        volumes.release("running")
        assert mounted_points(volumes.mounts_dir) == []
        assert not running.parent.exists()
    finally:
        for point in mounted_points(short_tmp):
            subprocess.run(["fusermount3", "-uz", str(point)], check=False)


def test_volumes_are_bound_at_their_mount_paths(short_tmp: Path) -> None:
    settings = RunnerSettings(data_dir=short_tmp / "data")
    spec = SandboxSpec(
        sandbox_id="s1",
        organization_id="o1",
        image="img",
        volumes=[
            VolumeMountSpec(volume_id="v1", mount_path="/data", key_prefix="volumes/v1"),
            VolumeMountSpec(volume_id="v1", mount_path="/mnt/x", subpath="a/b", key_prefix="volumes/v1"),
        ],
    )
    binds = build_container_config(spec, settings, "runner-1")["HostConfig"]["Binds"]
    mounts = VolumeMounts(settings)
    assert f"{mounts.mount_point('s1', 0)}:/data:rw,nosuid,nodev" in binds
    assert f"{mounts.mount_point('s1', 1)}:/mnt/x:rw,nosuid,nodev" in binds
    # Under the runner's tmpfs: the sandbox sees `/volumes/...`, not the host's layout.
    assert mounts.mount_point("s1", 0).is_relative_to(settings.runtime_dir)
