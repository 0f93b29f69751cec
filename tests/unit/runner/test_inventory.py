"""Capacity accounting for the heartbeat."""

from __future__ import annotations

from pathlib import Path

from tidepool_contracts.models import RunnerCapabilities
from tidepool_contracts.states import SandboxState
from tidepool_runner.container_backend import hosted_sandbox
from tidepool_runner.engine import ContainerSummary
from tidepool_runner.inventory import memory_total_gib, runner_info
from tidepool_runtime.settings import Settings


def sandbox(state: str, cpu: str, memory: str) -> ContainerSummary:
    return ContainerSummary(
        container_id=state + cpu,
        state=state,
        labels={"tidepool.sandbox": "x", "tidepool.cpu": cpu, "tidepool.memory_gib": memory},
    )


def hosted(*containers: ContainerSummary) -> list:  # type: ignore[type-arg]
    return [hosted_sandbox(container) for container in containers]


def test_only_running_sandboxes_allocate(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, runner_public_url="http://r:1", runner_region="eu")
    containers = hosted(
        sandbox("running", "2", "4"), sandbox("running", "1", "1"), sandbox("exited", "8", "8")
    )
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


def test_container_states_map_to_route_states_and_allocation() -> None:
    paused, created, odd = hosted(
        sandbox("paused", "2", "2"), sandbox("created", "1", "1"), sandbox("dead", "1", "1")
    )
    # A paused sandbox is started for its route but holds no cpu or memory (as before the backend interface).
    assert (paused.state, paused.running) == (SandboxState.STARTED, False)
    assert (created.state, created.running) == (SandboxState.STOPPED, False)
    assert odd.state is SandboxState.ERROR
    (bad_labels,) = hosted(ContainerSummary("c", "running", {"tidepool.sandbox": "y", "tidepool.cpu": "two"}))
    assert (bad_labels.sandbox_id, bad_labels.cpu, bad_labels.memory_gib, bad_labels.running) == (
        "y",
        0,
        0,
        True,
    )


def test_the_heartbeat_carries_the_backend_capabilities(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert runner_info(settings, "r", []).capabilities == RunnerCapabilities()
    pods = RunnerCapabilities(isolation="pod", live_resize=False)
    assert runner_info(settings, "r", [], pods).capabilities == pods
