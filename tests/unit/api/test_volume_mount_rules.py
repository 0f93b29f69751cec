"""Issue #13: Daytona's mount-path and subpath rules (pure checks; the SDK tests show them end to end)."""

from __future__ import annotations

import pytest

from tidepool_api.errors import ApiError
from tidepool_api.schemas import VolumeMount
from tidepool_api.volumes import check_mount_path, check_mounts, check_subpath, mount_specs


@pytest.mark.parametrize(
    "path",
    ["data", "", "/", "//", "/a/../b", "/a/./b", "/a/..", "/a/.", "/a//b", "/proc", "/proc/x", "/sys",
     "/dev/shm", "/boot", "/etc", "/etc/x", "/bin", "/sbin", "/lib", "/lib64/x", "/usr", "/tmp", "/home"],
)  # fmt: skip
def test_refused_mount_paths(path: str) -> None:
    with pytest.raises(ApiError) as refused:
        check_mount_path(path)
    assert refused.value.status_code == 400
    assert "Invalid mount path" in refused.value.message


@pytest.mark.parametrize(
    "path", ["/data", "/home/daytona/vol", "/mnt/a/b", "/usr/local/data", "/procfs", "//x"]
)
def test_accepted_mount_paths(path: str) -> None:
    check_mount_path(path)


@pytest.mark.parametrize("subpath", ["/abs", "a/../b", "..", "a//b"])
def test_refused_subpaths(subpath: str) -> None:
    with pytest.raises(ApiError):
        check_subpath(subpath)


def test_subpath_is_normalised() -> None:
    assert check_subpath("") == ""
    assert check_subpath("team/a/") == "team/a"
    assert check_subpath("./x") == "x"


def test_duplicate_and_nested_mounts_are_refused() -> None:
    same = [VolumeMount(volume_id="v", mount_path="/data"), VolumeMount(volume_id="w", mount_path="/data/")]
    with pytest.raises(ApiError, match="two volumes"):
        check_mounts(same)
    nested = [
        VolumeMount(volume_id="v", mount_path="/data"),
        VolumeMount(volume_id="w", mount_path="/data/x"),
    ]
    with pytest.raises(ApiError, match="nested"):
        check_mounts(nested)
    check_mounts([VolumeMount(volume_id="v", mount_path="/a"), VolumeMount(volume_id="v", mount_path="/ab")])


def test_mount_specs_carry_the_storage_prefix() -> None:
    specs = mount_specs([{"volumeId": "abc", "mountPath": "/data", "subpath": "x"}])
    assert specs[0].key_prefix == "volumes/abc" and specs[0].subpath == "x" and specs[0].mount_path == "/data"
