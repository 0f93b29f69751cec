"""What this runner has and hosts: the capacity heartbeat, and re-adopting containers after a restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from tidepool_contracts.models import RunnerCapabilities, RunnerInfo, SandboxRoute
from tidepool_contracts.states import SandboxState
from tidepool_runner.container_config import CPU_LABEL, MEMORY_LABEL, ORGANIZATION_LABEL, SANDBOX_LABEL
from tidepool_runner.disks import SandboxDisks
from tidepool_runner.engine import (
    ContainerEngine,
    ContainerSummary,
    EngineUnavailableError,
    SandboxFailedError,
)
from tidepool_runtime.broker import KeyValue, kv_put
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.inventory")

HEARTBEAT_INTERVAL_SECONDS = 5.0
ADOPTION_RETRY_SECONDS = 2.0
MEMINFO_PATH = Path("/proc/meminfo")
KIB_PER_GIB = 1024 * 1024

# Engine container states -> the sandbox state a route reports.
STATE_BY_CONTAINER_STATE: dict[str, SandboxState] = {
    "running": SandboxState.STARTED,
    "paused": SandboxState.STARTED,
    "created": SandboxState.STOPPED,
    "configured": SandboxState.STOPPED,
    "exited": SandboxState.STOPPED,
    "stopped": SandboxState.STOPPED,
}


def memory_total_gib(meminfo_path: Path = MEMINFO_PATH) -> int:
    for line in meminfo_path.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // KIB_PER_GIB
    return 0


def _int_label(container: ContainerSummary, label: str) -> int:
    try:
        return int(container.labels.get(label, "0"))
    except ValueError:
        return 0


def runner_info(
    settings: RunnerSettings,
    runner_id: str,
    containers: list[ContainerSummary] | None,
    capabilities: RunnerCapabilities | None = None,
) -> RunnerInfo:
    """Capacity, allocation and what the backend can do (`capabilities`; None: the defaults, which are
    the container engine's); `containers` None means the engine is unreachable (then: unschedulable)."""
    running = [container for container in containers or [] if container.state == "running"]
    return RunnerInfo(
        runner_id=runner_id,
        url=settings.effective_runner_url,
        region=settings.runner_region,
        cpu_total=os.cpu_count() or 1,
        memory_total_gib=memory_total_gib(),
        # Like upstream: CPU and memory are allocated only while a sandbox runs.
        cpu_allocated=sum(_int_label(container, CPU_LABEL) for container in running),
        memory_allocated_gib=sum(_int_label(container, MEMORY_LABEL) for container in running),
        sandboxes_running=len(running),
        sandboxes_total=len(containers or []),
        unschedulable=containers is None,
        capabilities=capabilities or RunnerCapabilities(),
    )


class Inventory:
    def __init__(
        self,
        *,
        settings: RunnerSettings,
        runner_id: str,
        engine: ContainerEngine,
        runners: KeyValue,
        routes: KeyValue,
        disks: SandboxDisks,
        capabilities: RunnerCapabilities | None = None,
    ) -> None:
        self._settings = settings
        self._capabilities = capabilities
        self._disks = disks
        self._runner_id = runner_id
        self._engine = engine
        self._runners = runners
        self._routes = routes

    async def current_info(self) -> RunnerInfo:
        try:
            containers: list[ContainerSummary] | None = await self._engine.list_sandboxes()
        except (EngineUnavailableError, SandboxFailedError) as error:
            log.warning("inventory.engine_unavailable", error=str(error))
            containers = None
        return runner_info(self._settings, self._runner_id, containers, self._capabilities)

    async def heartbeat_forever(self) -> None:
        while True:
            try:
                await kv_put(self._runners, self._runner_id, await self.current_info())
            except Exception as error:  # a missed beat is harmless; the entry only expires after 30 s
                log.warning("inventory.heartbeat_failed", error=str(error))
            await asyncio.sleep(HEARTBEAT_INTERVAL_SECONDS)

    async def adopt_until_done(self) -> None:
        while True:
            try:
                await self.adopt_containers()
                return
            except (EngineUnavailableError, SandboxFailedError) as error:
                log.warning("inventory.adoption_failed", error=str(error))
            await asyncio.sleep(ADOPTION_RETRY_SECONDS)

    async def adopt_containers(self) -> int:
        """Publish a route with the real state of every sandbox container on this engine, so the proxy and the
        API converge after a runner restart, and delete the disks of sandboxes whose container is gone (a
        destroy interrupted between removing the container and its disk). Returns how many were adopted."""
        containers = await self._engine.list_sandboxes()
        hosted = {container.labels.get(SANDBOX_LABEL) for container in containers}
        for orphan in self._disks.disk_ids() - hosted:
            log.info("inventory.orphan_disk_removed", sandbox_id=orphan)
            await asyncio.to_thread(self._disks.remove, orphan)
        for container in containers:
            sandbox_id = container.labels.get(SANDBOX_LABEL)
            if not sandbox_id:
                continue
            route = SandboxRoute(
                sandbox_id=sandbox_id,
                organization_id=container.labels.get(ORGANIZATION_LABEL, ""),
                runner_id=self._runner_id,
                runner_url=self._settings.effective_runner_url,
                state=STATE_BY_CONTAINER_STATE.get(container.state, SandboxState.ERROR),
            )
            await kv_put(self._routes, sandbox_id, route)
        log.info("inventory.adopted", containers=len(containers))
        return len(containers)
