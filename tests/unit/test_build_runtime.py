"""The build engine's runc wrapper (tidepool_stack.build_runtime): what it repairs, and only that."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tidepool_stack.build_runtime import (
    give_root_directory,
    give_whiteouts,
    namespace_root,
    overlay_upper_dir,
)

ROOT = (268435456, 268500992)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown and mknod need root")

MOUNTINFO = (
    "22 1 253:0 / / rw,relatime - ext4 /dev/vda rw\n"
    "900 22 0:77 / /var/lib/containers/storage/overlay/abc/merged rw,nodev - overlay overlay "
    "rw,lowerdir=/l/A:/l/B,upperdir=/var/lib/containers/storage/overlay/abc/diff,workdir=/w,volatile\n"
    "901 22 0:77 / /var/tmp/buildah1/mnt/rootfs rw,nodev - overlay overlay "
    "rw,lowerdir=/l/A:/l/B,upperdir=/var/lib/containers/storage/overlay/abc/diff,workdir=/w\n"
    "902 22 253:0 /srv /var/tmp/buildah2/mnt/rootfs rw - ext4 /dev/vda rw\n"
)


def test_the_upper_directory_of_an_overlay_or_its_bind_mount_is_found() -> None:
    upper = "/var/lib/containers/storage/overlay/abc/diff"
    assert overlay_upper_dir("/var/lib/containers/storage/overlay/abc/merged", MOUNTINFO) == upper
    assert overlay_upper_dir("/var/tmp/buildah1/mnt/rootfs", MOUNTINFO) == upper
    assert overlay_upper_dir("/var/tmp/buildah2/mnt/rootfs", MOUNTINFO) is None  # not an overlay
    assert overlay_upper_dir("/nowhere", MOUNTINFO) is None


def test_only_a_user_namespace_mapping_root_is_acted_on() -> None:
    mapped = {
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": ROOT[0], "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": ROOT[1], "size": 65536}],
        }
    }
    assert namespace_root(mapped) == ROOT
    assert namespace_root({"linux": {}}) is None
    assert namespace_root({}) is None


@as_root
def test_the_root_directory_goes_to_the_namespaces_root_once(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    os.chown(rootfs, 0, 0)
    assert give_root_directory(str(rootfs), ROOT)
    assert (rootfs.stat().st_uid, rootfs.stat().st_gid) == ROOT
    assert not give_root_directory(str(rootfs), (1, 1))  # already someone's: left alone
    assert (rootfs.stat().st_uid, rootfs.stat().st_gid) == ROOT


@as_root
def test_only_whiteouts_of_the_hosts_root_change_owner(tmp_path: Path) -> None:
    upper = tmp_path / "diff"
    (upper / "etc").mkdir(parents=True)
    whiteout = upper / "etc" / "deleted"
    os.mknod(whiteout, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.chown(whiteout, 0, 0)
    device = upper / "etc" / "null"
    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a real device node: not a whiteout
    plain = upper / "etc" / "file"
    plain.write_text("x")
    os.chown(plain, 0, 0)
    link = upper / "link"
    link.symlink_to(whiteout)

    assert give_whiteouts(str(upper), ROOT) == 1
    assert (whiteout.lstat().st_uid, whiteout.lstat().st_gid) == ROOT
    assert device.lstat().st_uid == 0
    assert plain.lstat().st_uid == 0
    assert link.lstat().st_uid == os.geteuid()


def test_runc_gets_the_same_arguments(tmp_path: Path) -> None:
    recorded = tmp_path / "args.json"
    fake_runc = tmp_path / "runc"
    fake_runc.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(recorded)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    fake_runc.chmod(0o755)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}, "linux": {}}))
    arguments = ["--root", "/run/runc", "create", "--bundle", str(bundle), "--pid-file", "/p", "ctr"]
    env = {**os.environ, "TIDEPOOL_BUILD_RUNC": str(fake_runc)}
    subprocess.run([sys.executable, "-m", "tidepool_stack.build_runtime", *arguments], env=env, check=True)
    assert json.loads(recorded.read_text()) == arguments
