"""Volumes (issue #13) through the official SDK against a real stack: the volume API, mounts on create
(FUSE `rclone mount` of the embedded object storage, bound into the container), sharing between sandboxes,
persistence beyond them, and the refusals that leave nothing behind."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaError, DaytonaNotFoundError, VolumeMount

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

VISIBLE_TIMEOUT = 60.0


def wait_ready(daytona: Daytona, name: str) -> None:
    wait_until(lambda: daytona.volume.get(name).state in ("ready", "error"), f"volume {name} never settled")
    assert daytona.volume.get(name).state == "ready", daytona.volume.get(name).error_reason


def read(sandbox: object, path: str) -> str:
    response = sandbox.process.exec(f"cat {path} 2>/dev/null || true")  # type: ignore[attr-defined]
    return str(response.result)


def fuse_mounts(stack: StackThread) -> list[str]:
    volumes_dir = str(Path(stack.stack.env["TIDEPOOL_DATA_DIR"]) / "run" / "volumes")
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(volumes_dir)]


def sandboxes_named(daytona: Daytona, prefix: str) -> list[str]:
    return [item.id for item in daytona.list() if item.name.startswith(prefix)]


def test_volume_shared_by_sandboxes_and_outliving_them(stack: StackThread) -> None:
    daytona = Daytona()
    name = f"vol-{uuid.uuid4().hex[:8]}"
    volume = daytona.volume.create(name)
    assert volume.name == name
    wait_ready(daytona, name)
    assert name in {item.name for item in daytona.volume.list()}
    assert daytona.volume.get(name).id == volume.id

    whole = CreateSandboxFromSnapshotParams(
        volumes=[VolumeMount(volume_id=volume.id, mount_path="/home/daytona/vol")]
    )
    # By name, and a subpath as the mount's root.
    sub = CreateSandboxFromSnapshotParams(
        volumes=[VolumeMount(volume_id=name, mount_path="/mnt/shared", subpath="team/a")]
    )
    first = daytona.create(whole)
    second = daytona.create(sub)
    try:
        assert first.volumes and first.volumes[0].volume_id == volume.id
        # The sandbox user writes on the volume; the other sandbox sees it (after its directory cache).
        assert first.process.exec("echo from-first > /home/daytona/vol/one.txt").exit_code == 0
        assert first.process.exec("mkdir -p /home/daytona/vol/team/a").exit_code == 0
        assert first.process.exec("echo into-sub > /home/daytona/vol/team/a/from-first.txt").exit_code == 0
        wait_until(
            lambda: read(second, "/mnt/shared/from-first.txt") == "into-sub\n",
            "the subpath mount never showed the first sandbox's write",
            timeout=VISIBLE_TIMEOUT,
            interval=0.5,
        )
        # The subpath is the root: the rest of the volume is out of reach.
        assert read(second, "/mnt/shared/../one.txt") == ""
        assert second.process.exec("echo from-second > /mnt/shared/two.txt").exit_code == 0
        wait_until(
            lambda: read(first, "/home/daytona/vol/team/a/two.txt") == "from-second\n",
            "the first sandbox never saw the second's write",
            timeout=VISIBLE_TIMEOUT,
            interval=0.5,
        )
        owner = first.process.exec("stat -c %U /home/daytona/vol/one.txt").result.strip()
        assert owner == "daytona"

        # In use: refused, and the volume stays.
        with pytest.raises(DaytonaError) as refused:
            daytona.volume.delete(volume)
        assert getattr(refused.value, "status_code", None) == 409
        assert daytona.volume.get(name).state == "ready"
    finally:
        daytona.delete(first)
        daytona.delete(second)
    wait_until(lambda: not fuse_mounts(stack), "deleting the sandboxes must leave no FUSE mount behind")

    third = daytona.create(whole)
    try:
        assert read(third, "/home/daytona/vol/one.txt") == "from-first\n"
        assert read(third, "/home/daytona/vol/team/a/two.txt") == "from-second\n"
        # Stop unmounts, start mounts again.
        third.stop()
        wait_until(lambda: not fuse_mounts(stack), "stop must unmount the sandbox's volumes")
        third.start()
        assert read(third, "/home/daytona/vol/one.txt") == "from-first\n"
    finally:
        daytona.delete(third)
    wait_until(lambda: not fuse_mounts(stack), "deleting the sandbox must leave no FUSE mount behind")

    wait_until(lambda: _deleted(daytona, volume), "the volume was never deletable after its sandboxes went")
    wait_until(
        lambda: name not in {item.name for item in daytona.volume.list()}, "deleted volume still listed"
    )
    with pytest.raises(DaytonaNotFoundError):
        daytona.volume.get(name)
    # The name is free again, and the new volume is empty.
    again = daytona.volume.create(name)
    assert again.id != volume.id
    wait_ready(daytona, name)
    fresh = daytona.create(
        CreateSandboxFromSnapshotParams(volumes=[VolumeMount(volume_id=again.id, mount_path="/data")])
    )
    try:
        assert fresh.process.exec("ls -A /data").result.strip() == ""
    finally:
        daytona.delete(fresh)
    wait_until(lambda: _deleted(daytona, again), "the second volume was never deleted")


def _deleted(daytona: Daytona, volume: object) -> bool:
    try:
        daytona.volume.delete(volume)  # type: ignore[arg-type]
    except DaytonaError as error:
        if getattr(error, "status_code", None) == 409:
            return False  # the scheduler has not yet recorded a sandbox as destroyed
        raise
    return True


def test_get_with_create(stack: StackThread) -> None:
    daytona = Daytona()
    name = f"vol-{uuid.uuid4().hex[:8]}"
    with pytest.raises(DaytonaNotFoundError):
        daytona.volume.get(name)
    created = daytona.volume.get(name, create=True)
    assert created.name == name
    wait_ready(daytona, name)
    assert daytona.volume.get(name, create=True).id == created.id
    daytona.volume.delete(daytona.volume.get(name))
    assert name not in {item.name for item in daytona.volume.list()}


@pytest.mark.parametrize(
    ("mount_path", "subpath", "volume_ref", "status", "words"),
    [
        ("data", None, None, 400, "absolute"),
        ("/proc", None, None, 400, "system directory"),
        ("/proc/x", None, None, 400, "system directory"),
        ("/", None, None, 400, "root"),
        ("/etc", None, None, 400, "system directory"),
        ("/a/../b", None, None, 400, ". or .."),
        ("/data", "../x", None, 400, "subpath"),
        ("/data", None, "no-such-volume", 404, "not found"),
    ],
)
def test_bad_mounts_are_refused_and_leave_nothing(
    stack: StackThread, mount_path: str, subpath: str | None, volume_ref: str | None, status: int, words: str
) -> None:
    daytona = Daytona()
    name = f"vol-bad-{uuid.uuid4().hex[:8]}"
    volume = daytona.volume.get(name, create=True)
    wait_ready(daytona, name)
    try:
        sandbox_name = f"bad-{uuid.uuid4().hex[:8]}"
        mount = VolumeMount(volume_id=volume_ref or volume.id, mount_path=mount_path, subpath=subpath)
        response = httpx.post(
            f"{stack.api_url}/sandbox",
            headers={"Authorization": f"Bearer {stack.api_key}"},
            json={"name": sandbox_name, "volumes": [mount.model_dump(by_alias=True, exclude_none=True)]},
            timeout=60,
        )
        assert response.status_code == status, response.text
        assert words in response.json()["message"]
        assert sandboxes_named(daytona, sandbox_name) == []
        with pytest.raises(DaytonaError):
            daytona.create(CreateSandboxFromSnapshotParams(name=sandbox_name, volumes=[mount]))
        assert sandboxes_named(daytona, sandbox_name) == []
        assert not fuse_mounts(stack)
    finally:
        daytona.volume.delete(volume)


def test_two_mounts_on_one_path_are_refused(stack: StackThread) -> None:
    daytona = Daytona()
    name = f"vol-dup-{uuid.uuid4().hex[:8]}"
    volume = daytona.volume.get(name, create=True)
    wait_ready(daytona, name)
    try:
        sandbox_name = f"dup-{uuid.uuid4().hex[:8]}"
        mounts = [
            VolumeMount(volume_id=volume.id, mount_path="/data"),
            VolumeMount(volume_id=volume.id, mount_path="/data/", subpath="x"),
        ]
        with pytest.raises(DaytonaError) as refused:
            daytona.create(CreateSandboxFromSnapshotParams(name=sandbox_name, volumes=mounts))
        assert getattr(refused.value, "status_code", None) == 400
        assert "two volumes" in str(refused.value)
        assert sandboxes_named(daytona, sandbox_name) == []
    finally:
        daytona.volume.delete(volume)


def test_runner_kill_leaves_no_stale_mount(stack: StackThread) -> None:
    """kill -9 of the runner: rclone runs detached, so the running sandbox keeps its volume; a restarted
    runner keeps live mounts of running sandboxes and removes the rest; stop/start mounts again."""
    daytona = Daytona()
    name = f"vol-kill-{uuid.uuid4().hex[:8]}"
    volume = daytona.volume.get(name, create=True)
    wait_ready(daytona, name)
    sandbox = daytona.create(
        CreateSandboxFromSnapshotParams(volumes=[VolumeMount(volume_id=volume.id, mount_path="/data")])
    )
    try:
        assert sandbox.process.exec("echo before > /data/f.txt").exit_code == 0
        stack.kill("runner")
        stack.restart("runner")
        wait_until(
            lambda: _answers(sandbox), "the sandbox never answered after the runner restarted", timeout=120
        )
        assert read(sandbox, "/data/f.txt") == "before\n"
        assert all(_alive(point) for point in fuse_mounts(stack)), "a dead FUSE mount stayed"
        sandbox.stop()
        wait_until(lambda: not fuse_mounts(stack), "stop must unmount after a runner restart")
        sandbox.start()
        assert read(sandbox, "/data/f.txt") == "before\n"
    finally:
        daytona.delete(sandbox)
    wait_until(lambda: not fuse_mounts(stack), "delete must unmount")
    wait_until(lambda: _deleted(daytona, volume), "the volume was never deleted")


def _answers(sandbox: object) -> bool:
    try:
        return sandbox.process.exec("true").exit_code == 0  # type: ignore[attr-defined]
    except DaytonaError:
        return False


def _alive(point: str) -> bool:
    return subprocess.run(["stat", point], capture_output=True, check=False).returncode == 0


def test_archive_restore_and_fork_keep_the_volume_mounted_not_copied(stack: StackThread) -> None:
    daytona = Daytona()
    name = f"vol-keep-{uuid.uuid4().hex[:8]}"
    volume = daytona.volume.create(name)
    wait_ready(daytona, name)
    mount = CreateSandboxFromSnapshotParams(
        volumes=[VolumeMount(volume_id=volume.id, mount_path="/home/daytona/vol")]
    )
    sandbox = daytona.create(mount)
    fork = None
    try:
        assert sandbox.process.exec("echo before > /home/daytona/vol/kept.txt").exit_code == 0
        fork = sandbox.fork()
        # The fork mounts the same volume: a write of the parent after the fork shows in the child.
        assert sandbox.process.exec("echo after-fork > /home/daytona/vol/late.txt").exit_code == 0
        wait_until(
            lambda: read(fork, "/home/daytona/vol/late.txt") == "after-fork\n",
            "the fork does not mount the parent's volume",
            timeout=VISIBLE_TIMEOUT,
            interval=0.5,
        )
        daytona.delete(fork)
        fork = None
        sandbox.stop()
        sandbox.archive()
        assert daytona.get(sandbox.id).state == "archived"
        sandbox.start()
        assert read(sandbox, "/home/daytona/vol/kept.txt") == "before\n"
        # Mounted, not a copy in the archive: a write now lands on the volume the others see.
        assert sandbox.process.exec("echo restored > /home/daytona/vol/after.txt").exit_code == 0
        other = daytona.create(mount)
        try:
            wait_until(
                lambda: read(other, "/home/daytona/vol/after.txt") == "restored\n",
                "the restored sandbox's write did not reach the volume",
                timeout=VISIBLE_TIMEOUT,
                interval=0.5,
            )
        finally:
            daytona.delete(other)
    finally:
        if fork is not None:
            daytona.delete(fork)
        daytona.delete(sandbox)


def test_a_write_just_before_stop_or_delete_reaches_the_volume(stack: StackThread) -> None:
    """A newcomer's agent wrote its results and deleted its sandbox at once: the write must not be lost in
    the mount's write-back cache (the runner waits for the uploads before it unmounts)."""
    daytona = Daytona()
    name = f"vol-flush-{uuid.uuid4().hex[:8]}"
    volume = daytona.volume.create(name)
    wait_ready(daytona, name)
    mount = CreateSandboxFromSnapshotParams(volumes=[VolumeMount(volume_id=volume.id, mount_path="/data")])
    writer = daytona.create(mount)
    assert (
        writer.process.exec(
            "head -c 5000000 /dev/urandom > /data/big.bin; echo last > /data/stop.txt"
        ).exit_code
        == 0
    )
    writer.stop()
    writer.start()
    assert writer.process.exec("echo last > /data/delete.txt").exit_code == 0
    daytona.delete(writer)
    reader = daytona.create(mount)
    try:
        listing = reader.process.exec("cat /data/stop.txt /data/delete.txt; stat -c %s /data/big.bin").result
        assert listing.split() == ["last", "last", "5000000"], listing
    finally:
        daytona.delete(reader)


def test_another_organization_can_neither_see_nor_mount_nor_delete_a_volume(tenant: Daytona) -> None:
    daytona = Daytona()
    name = f"vol-private-{uuid.uuid4().hex[:8]}"
    volume = daytona.volume.create(name)
    wait_ready(daytona, name)
    try:
        assert name not in {item.name for item in tenant.volume.list()}
        for reference in (volume.id, name):
            with pytest.raises(DaytonaNotFoundError):
                tenant.volume.get(reference)
        with pytest.raises(DaytonaNotFoundError):
            tenant.volume.delete(volume)
        before = {item.id for item in tenant.list()}
        theirs = [VolumeMount(volume_id=volume.id, mount_path="/data")]
        with pytest.raises(DaytonaNotFoundError):
            tenant.create(CreateSandboxFromSnapshotParams(volumes=theirs))
        assert {item.id for item in tenant.list()} == before, "a refused create left a sandbox"
        assert daytona.volume.get(name).state == "ready"
    finally:
        daytona.volume.delete(daytona.volume.get(name))
