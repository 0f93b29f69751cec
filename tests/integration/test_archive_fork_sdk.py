"""Archive and restore, snapshot from a sandbox, and fork, through the official SDK (issue #10; behaviour spec
"Archive": only a stopped sandbox; "Fork": a copy of the filesystem in a new, independent sandbox, linked to
its parent, which cannot be deleted while the fork lives)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaError, Sandbox

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]
CONTAINERS_CONF = str(Path(__file__).resolve().parents[2] / "deploy/podman/containers.conf")


def container_exists(sandbox_id: str) -> bool:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", CONTAINERS_CONF)}
    listed = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"name=^tidepool-{sandbox_id}$", "--format", "{{.ID}}"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return bool(listed.stdout.strip())


def settle(sandbox: Sandbox, passing: str) -> None:
    """Refresh until the sandbox leaves the transitional state `passing` (the API answers archive after a
    bounded wait, so a slow commit may still be under way)."""

    def left() -> bool:
        sandbox.refresh_data()
        return sandbox.state != passing

    wait_until(left, f"sandbox {sandbox.id} stayed {passing}", timeout=300, interval=0.5)


def snapshot_state(daytona: Daytona, name: str) -> str:
    """The snapshot's state once it has left `pending` (a commit and push may outlast the API's wait)."""
    state = wait_until(
        lambda: (value := daytona.snapshot.get(name).state) != "pending" and value,
        f"snapshot {name} stayed pending",
        timeout=300,
        interval=0.5,
    )
    return getattr(state, "value", state)


def read(sandbox: Sandbox, path: str) -> str:
    return sandbox.fs.download_file(path).decode()


def test_archive_then_start_restores_files_env_and_labels(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create(
        CreateSandboxFromSnapshotParams(env_vars={"KEPT": "yes"}, labels={"team": "tide"}), timeout=180
    )
    try:
        sandbox.fs.upload_file(b"archived bytes", "notes/a.txt")
        as_root = sandbox.process.exec("sudo sh -c 'echo root-owned > /etc/tidepool-archive-test'")
        assert as_root.exit_code == 0, as_root.result

        # Only a stopped sandbox can be archived: Daytona's 400, with a message.
        with pytest.raises(DaytonaError) as refused:
            sandbox.archive()
        assert refused.value.status_code == 400, refused.value
        assert "not stopped" in str(refused.value)

        sandbox.stop(timeout=120)
        assert container_exists(sandbox.id)
        sandbox.archive()
        if sandbox.state == "archiving":
            settle(sandbox, "archiving")
        assert sandbox.state == "archived", sandbox.error_reason
        assert not container_exists(sandbox.id)  # the runner keeps nothing of it

        sandbox.start(timeout=180)
        assert sandbox.state == "started"
        assert read(sandbox, "notes/a.txt") == "archived bytes"
        assert sandbox.process.exec("cat /etc/tidepool-archive-test").result.strip() == "root-owned"
        # Owners survive the commit: the sandbox user still owns (and writes) its home.
        assert sandbox.process.exec("stat -c %U notes/a.txt").result.strip() == "daytona"
        assert sandbox.process.exec("echo more >> notes/a.txt").exit_code == 0
        assert sandbox.process.exec("echo $KEPT").result.strip() == "yes"
        assert daytona.get(sandbox.id).labels.get("team") == "tide"
    finally:
        daytona.delete(sandbox)


def test_snapshot_from_sandbox_then_create_from_it(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(), timeout=180)
    name = f"from-sandbox-{uuid.uuid4().hex[:8]}"
    created: Sandbox | None = None
    try:
        sandbox.fs.upload_file(b"in the snapshot", "snap.txt")
        sandbox.create_snapshot(name)
        assert snapshot_state(daytona, name) == "active"
        assert sandbox.state == "started"  # the source keeps its state

        created = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name), timeout=180)
        assert read(created, "snap.txt") == "in the snapshot"

        # A second snapshot of the same name is refused.
        with pytest.raises(DaytonaError) as taken:
            sandbox.create_snapshot(name)
        assert taken.value.status_code == 409, taken.value
    finally:
        if created is not None:
            daytona.delete(created)
        daytona.delete(sandbox)


def test_fork_copies_the_filesystem_then_both_diverge(stack: StackThread) -> None:
    daytona = Daytona()
    parent = daytona.create(
        CreateSandboxFromSnapshotParams(env_vars={"FROM": "parent"}, labels={"tree": "x"}), timeout=180
    )
    fork: Sandbox | None = None
    try:
        parent.fs.upload_file(b"shared", "shared.txt")
        fork = parent.fork(name=f"fork-{uuid.uuid4().hex[:8]}", timeout=180)
        assert fork.id != parent.id
        assert fork.state == "started"
        assert read(fork, "shared.txt") == "shared"
        assert fork.process.exec("echo $FROM").result.strip() == "parent"
        assert fork.labels.get("tree") == "x"

        # Independent from here on.
        parent.fs.upload_file(b"parent only", "shared.txt")
        fork.fs.upload_file(b"fork only", "mine.txt")
        assert read(fork, "shared.txt") == "shared"
        assert read(parent, "shared.txt") == "parent only"
        assert parent.process.exec("test -e mine.txt").exit_code != 0

        # Linked: the parent lists its fork, the fork names its parent.
        auth = {"Authorization": f"Bearer {stack.api_key}"}
        forks = httpx.get(f"{stack.api_url}/sandbox/{parent.id}/forks", headers=auth)
        assert [item["id"] for item in forks.json()] == [fork.id], forks.text
        assert httpx.get(f"{stack.api_url}/sandbox/{fork.id}/parent", headers=auth).json()["id"] == parent.id

        # A parent with a live fork cannot be deleted (409, with the reason); after the fork, it can.
        response = httpx.delete(f"{stack.api_url}/sandbox/{parent.id}", headers=auth)
        assert response.status_code == 409, response.text
        assert "fork" in response.json()["message"]
        daytona.delete(fork)
        fork = None
    finally:
        if fork is not None:
            daytona.delete(fork)
        daytona.delete(parent)
