"""Resize through the official SDK (issue #10 "Resize"; behaviour spec: a started sandbox may only grow cpu
and memory, hot; disk changes and shrinking need it stopped; disk never shrinks)."""

from __future__ import annotations

import pytest
from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaError, Resources, Sandbox

from tests.integration.stackthread import StackThread

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]
GIB = 1024**3


def limits(sandbox: Sandbox) -> tuple[int, int]:
    """(memory limit in bytes, cpu quota in cores) as the sandbox's own cgroup says (cgroup v1 here)."""
    memory = sandbox.process.exec("cat /sys/fs/cgroup/memory/memory.limit_in_bytes").result.strip()
    quota = sandbox.process.exec("cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us").result.strip()
    period = sandbox.process.exec("cat /sys/fs/cgroup/cpu/cpu.cfs_period_us").result.strip()
    return int(memory), int(quota) // int(period)


def disk_gib(sandbox: Sandbox) -> float:
    """Size of the filesystem holding the sandbox's writable layer, in GiB."""
    size_kib = sandbox.process.exec("df -k --output=size / | tail -1").result.strip()
    return int(size_kib) / (1024 * 1024)


def test_resize_rules_and_effects(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", resources=Resources(cpu=1, memory=1)), timeout=180
    )
    try:
        assert limits(sandbox) == (1 * GIB, 1)
        assert round(disk_gib(sandbox)) == 3

        # Hot: cpu and memory grow, live.
        sandbox.resize(Resources(cpu=2, memory=2))
        assert (sandbox.cpu, sandbox.memory, sandbox.state) == (2, 2, "started")
        assert limits(sandbox) == (2 * GIB, 2)
        # Refused while started: shrinking, and any disk change; nothing changes.
        for refused in (Resources(memory=1), Resources(cpu=1), Resources(disk=5)):
            with pytest.raises(DaytonaError) as caught:
                sandbox.resize(refused)
            assert caught.value.status_code == 400, caught.value
        sandbox.refresh_data()
        assert (sandbox.cpu, sandbox.memory, sandbox.disk, sandbox.state) == (2, 2, 3, "started")

        # The new limits outlive a restart (the engine alone would bring back the creation limits).
        sandbox.stop()
        sandbox.start()
        assert limits(sandbox) == (2 * GIB, 2)

        # Stopped: shrink cpu/memory, grow the disk; the disk never shrinks.
        sandbox.stop()
        with pytest.raises(DaytonaError) as caught:
            sandbox.resize(Resources(disk=2))
        assert caught.value.status_code == 400
        sandbox.resize(Resources(cpu=1, memory=1, disk=5))
        assert (sandbox.cpu, sandbox.memory, sandbox.disk, sandbox.state) == (1, 1, 5, "stopped")
        sandbox.start()
        assert limits(sandbox) == (1 * GIB, 1)
        assert round(disk_gib(sandbox)) == 5
        assert sandbox.process.exec("echo still-here").result.strip() == "still-here"
    finally:
        daytona.delete(sandbox)


def test_resize_needs_something_and_respects_the_organization_limits(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(language="python"), timeout=180)
    try:
        for refused in (Resources(), Resources(cpu=10_000), Resources(memory=100_000)):
            with pytest.raises(DaytonaError) as caught:
                sandbox.resize(refused)
            assert caught.value.status_code == 400, refused
        sandbox.refresh_data()
        assert sandbox.state == "started"
    finally:
        daytona.delete(sandbox)
