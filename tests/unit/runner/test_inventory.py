"""Capacity accounting for the heartbeat."""

from __future__ import annotations

from pathlib import Path

from tidepool_runner.engine import ContainerSummary
from tidepool_runner.inventory import memory_total_gib, runner_info
from tidepool_runtime.settings import Settings


def sandbox(state: str, cpu: str, memory: str) -> ContainerSummary:
    return ContainerSummary(
        container_id=state + cpu,
        state=state,
        labels={"tidepool.sandbox": "x", "tidepool.cpu": cpu, "tidepool.memory_gib": memory},
    )


def test_only_running_sandboxes_allocate(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, runner_public_url="http://r:1", runner_region="eu")
    containers = [sandbox("running", "2", "4"), sandbox("running", "1", "1"), sandbox("exited", "8", "8")]
    info = runner_info(settings, "runner-x", containers)
    assert (info.cpu_allocated, info.memory_allocated_gib) == (3, 5)
    assert (info.sandboxes_running, info.sandboxes_total) == (2, 3)
    assert (info.url, info.region, info.unschedulable) == ("http://r:1", "eu", False)
    assert info.cpu_total >= 1 and info.memory_total_gib >= 0


def test_unreachable_engine_makes_runner_unschedulable(tmp_path: Path) -> None:
    info = runner_info(Settings(data_dir=tmp_path), "runner-x", None)
    assert info.unschedulable and info.sandboxes_total == 0


def test_memory_total_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684096 kB\nMemFree:        23417400 kB\n")
    assert memory_total_gib(meminfo) == 23
