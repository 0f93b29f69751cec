"""Per-sandbox resource samples: every `sandbox_metrics_interval_seconds`, each running sandbox's CPU,
memory (cgroups.py), disk (its own filesystem, disks.py) and network, published on
`channels.SANDBOX_METRICS` for the telemetry service, which keeps them (issue #14, Daytona's
`daytona.sandbox.*` metrics).

CPU utilization is the CPU time used between two samples over the wall time between them and the
sandbox's CPU limit (%, 0-100 of the limit); a sandbox's first sample has none. One engine list per round
(which sandboxes run, with their organization) plus one inspect per newly seen container (its pid); the
rest are file reads in a worker thread. A failed read skips that sandbox for the round, never the loop.

`ContainerStats` reads them for the container-engine backend (its `SandboxBackend.stats`);
`ResourceSampler` publishes whatever the runner's backend returns.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import SandboxMetricsSample, utc_now
from tidepool_runner.backend import SandboxBackend
from tidepool_runner.cgroups import CgroupUsage, cgroup_paths, network_bytes, read_usage
from tidepool_runner.container_config import CPU_LABEL, ORGANIZATION_LABEL, SANDBOX_LABEL
from tidepool_runner.disks import SandboxDisks
from tidepool_runner.engine import ContainerEngine
from tidepool_runtime.broker import Bus

log = structlog.get_logger("tidepool.runner.samples")


@dataclass
class _Seen:
    pid: int
    paths: dict[str, str]
    cpu_ns: int | None = None
    at_ns: int = 0


@dataclass(frozen=True)
class _Reading:
    usage: CgroupUsage
    network: tuple[int, int] | None
    filesystem: tuple[int, int] | None  # (used, total) bytes
    at_ns: int


class ContainerStats:
    """The container backend's `stats`: one sample per running sandbox container, read from its cgroups,
    its network namespace and its own disk."""

    def __init__(self, *, runner_id: str, engine: ContainerEngine, disks: SandboxDisks) -> None:
        self._runner_id = runner_id
        self._engine = engine
        self._disks = disks
        self._seen: dict[str, _Seen] = {}  # container id -> what the previous round read

    async def collect(self) -> list[SandboxMetricsSample]:
        """One sample per running sandbox (CPU utilization since the previous call)."""
        running = [c for c in await self._engine.list_sandboxes() if c.state == "running"]
        self._seen = {
            cid: seen for cid, seen in self._seen.items() if cid in {c.container_id for c in running}
        }
        samples: list[SandboxMetricsSample] = []
        for container in running:
            sandbox_id = container.labels.get(SANDBOX_LABEL, "")
            if not sandbox_id:
                continue
            seen = self._seen.get(container.container_id)
            if seen is None:
                status = await self._engine.inspect(container.container_id)
                if status is None or not status.pid:
                    continue
                try:
                    paths = await asyncio.to_thread(cgroup_paths, status.pid)
                except OSError:
                    continue
                seen = self._seen[container.container_id] = _Seen(status.pid, paths)
            try:
                reading = await asyncio.to_thread(self._read, sandbox_id, seen)
            except OSError:  # the process is gone (stopped meanwhile): look it up afresh next round
                self._seen.pop(container.container_id, None)
                continue
            samples.append(self._sample(sandbox_id, container.labels, seen, reading))
        return samples

    def _read(self, sandbox_id: str, seen: _Seen) -> _Reading:
        if not os.path.exists(f"/proc/{seen.pid}"):
            raise OSError(f"process {seen.pid} is gone")
        filesystem = None
        try:
            stat = os.statvfs(self._disks.paths(sandbox_id).mount)
            total = stat.f_blocks * stat.f_frsize
            filesystem = (total - stat.f_bfree * stat.f_frsize, total)
        except OSError:
            pass
        return _Reading(read_usage(seen.paths), network_bytes(seen.pid), filesystem, time.time_ns())

    def _sample(
        self, sandbox_id: str, labels: dict[str, str], seen: _Seen, reading: _Reading
    ) -> SandboxMetricsSample:
        usage = reading.usage
        cpu_limit = usage.cpu_limit
        if cpu_limit is None and labels.get(CPU_LABEL, "").isdigit():
            cpu_limit = float(labels[CPU_LABEL])
        utilization = None
        if usage.cpu_ns is not None and seen.cpu_ns is not None and reading.at_ns > seen.at_ns:
            cores_used = (usage.cpu_ns - seen.cpu_ns) / (reading.at_ns - seen.at_ns)
            utilization = max(0.0, min(100.0, 100.0 * cores_used / (cpu_limit or os.cpu_count() or 1)))
        seen.cpu_ns, seen.at_ns = usage.cpu_ns, reading.at_ns
        return SandboxMetricsSample(
            sandbox_id=sandbox_id,
            organization_id=labels.get(ORGANIZATION_LABEL, ""),
            runner_id=self._runner_id,
            sampled_at=utc_now(),
            cpu_utilization=utilization,
            cpu_limit=cpu_limit,
            memory_usage=usage.memory_usage,
            memory_limit=usage.memory_limit,
            memory_cache=usage.memory_cache,
            filesystem_usage=reading.filesystem[0] if reading.filesystem else None,
            filesystem_total=reading.filesystem[1] if reading.filesystem else None,
            network_rx_bytes=reading.network[0] if reading.network else None,
            network_tx_bytes=reading.network[1] if reading.network else None,
        )


class ResourceSampler:
    """Publishes the backend's samples (`SandboxBackend.stats`) every `interval` seconds."""

    def __init__(self, *, backend: SandboxBackend, bus: Bus, interval: float) -> None:
        self._backend = backend
        self._bus = bus
        self._interval = interval

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sample_once()
            except Exception as error:  # the engine or NATS briefly away: next round
                log.warning("samples.round_failed", error=str(error))

    async def sample_once(self) -> int:
        """Publish one sample per running sandbox; returns how many were published."""
        published = 0
        for sample in await self._backend.stats():
            await self._bus.publish(channels.SANDBOX_METRICS, sample, sandbox_id=sample.sandbox_id)
            published += 1
        return published
