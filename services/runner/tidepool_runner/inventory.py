"""What this runner has and hosts (through its SandboxBackend): the capacity and capabilities heartbeat,
and re-adopting sandboxes after a restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from tidepool_contracts.models import RunnerCapabilities, RunnerInfo, SandboxRoute
from tidepool_runner.backend import BackendUnavailableError, HostedSandbox, SandboxBackend, SandboxFailedError
from tidepool_runtime.broker import KeyValue, kv_put
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.inventory")

ADOPTION_RETRY_SECONDS = 2.0
MEMINFO_PATH = Path("/proc/meminfo")
KIB_PER_GIB = 1024 * 1024


def memory_total_gib(meminfo_path: Path = MEMINFO_PATH) -> int:
    for line in meminfo_path.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // KIB_PER_GIB
    return 0


def runner_info(
    settings: RunnerSettings,
    runner_id: str,
    sandboxes: list[HostedSandbox] | None,
    capabilities: RunnerCapabilities | None = None,
) -> RunnerInfo:
    """Capacity, allocation and what the backend can do (`capabilities`; None: the defaults, which are
    the container engine's); `sandboxes` None means the backend cannot tell (then: unschedulable)."""
    running = [sandbox for sandbox in sandboxes or [] if sandbox.running]
    return RunnerInfo(
        runner_id=runner_id,
        url=settings.effective_runner_url,
        region=settings.runner_region,
        cpu_total=os.cpu_count() or 1,
        memory_total_gib=memory_total_gib(),
        # Like upstream: CPU and memory are allocated only while a sandbox runs.
        cpu_allocated=sum(sandbox.cpu for sandbox in running),
        memory_allocated_gib=sum(sandbox.memory_gib for sandbox in running),
        sandboxes_running=len(running),
        sandboxes_total=len(sandboxes or []),
        unschedulable=sandboxes is None,
        capabilities=capabilities or RunnerCapabilities(),
    )


class Inventory:
    def __init__(
        self,
        *,
        settings: RunnerSettings,
        runner_id: str,
        backend: SandboxBackend,
        runners: KeyValue,
        routes: KeyValue,
    ) -> None:
        self._settings = settings
        self._runner_id = runner_id
        self._backend = backend
        self._runners = runners
        self._routes = routes

    async def current_info(self) -> RunnerInfo:
        try:
            sandboxes: list[HostedSandbox] | None = await self._backend.list_sandboxes()
        except (BackendUnavailableError, SandboxFailedError) as error:
            log.warning("inventory.engine_unavailable", error=str(error))
            sandboxes = None
        return runner_info(self._settings, self._runner_id, sandboxes, self._backend.capabilities)

    async def heartbeat_forever(self) -> None:
        while True:
            try:
                await kv_put(self._runners, self._runner_id, await self.current_info())
            except Exception as error:  # a missed beat is harmless; the entry only expires after 30 s
                log.warning("inventory.heartbeat_failed", error=str(error))
            await asyncio.sleep(self._settings.runner_heartbeat_interval_seconds)

    async def adopt_until_done(self) -> None:
        while True:
            try:
                await self.adopt_containers()
                return
            except (BackendUnavailableError, SandboxFailedError) as error:
                log.warning("inventory.adoption_failed", error=str(error))
            await asyncio.sleep(ADOPTION_RETRY_SECONDS)

    async def adopt_containers(self) -> int:
        """Publish a route with the real state of every sandbox the backend hosts, so the proxy and the API
        converge after a runner restart (the backend first removes leftovers of sandboxes that are gone).
        Returns how many were adopted."""
        sandboxes = await self._backend.adopt()
        for sandbox in sandboxes:
            if not sandbox.sandbox_id:
                continue
            route = SandboxRoute(
                sandbox_id=sandbox.sandbox_id,
                organization_id=sandbox.organization_id,
                runner_id=self._runner_id,
                runner_url=self._settings.effective_runner_url,
                state=sandbox.state,
            )
            await kv_put(self._routes, sandbox.sandbox_id, route)
        log.info("inventory.adopted", containers=len(sandboxes))
        return len(sandboxes)
