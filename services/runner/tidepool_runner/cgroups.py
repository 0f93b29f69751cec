"""A container's CPU and memory from the host's cgroups, found through one of its processes
(`/proc/<pid>/cgroup`). Reads cgroup v1 controllers where mounted (this hybrid host: `cpu`, `cpuacct`,
`memory` under /sys/fs/cgroup) and the v2 unified hierarchy otherwise; a file that is not there gives None.

Plain file reads, no engine call: a few hundred microseconds per container, run in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_ROOT = Path("/proc")
# cgroup v1 reports "no limit" as a huge page-aligned number; anything at or above this is unlimited.
UNLIMITED_BYTES = 1 << 60


@dataclass(frozen=True)
class CgroupUsage:
    """`cpu_ns`: CPU time used since the container started (ns); `cpu_limit`: cores (None: unlimited);
    memory in bytes: `memory_usage` without the page cache, `memory_cache` the page cache."""

    cpu_ns: int | None
    cpu_limit: float | None
    memory_usage: int | None
    memory_limit: int | None
    memory_cache: int | None


def cgroup_paths(pid: int, proc_root: Path = PROC_ROOT) -> dict[str, str]:
    """Controller -> path of `pid`'s cgroup (`""` is the v2 unified one). OSError if the process is gone."""
    paths: dict[str, str] = {}
    for line in (proc_root / str(pid) / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def _stat(path: Path) -> dict[str, int]:
    text = _read(path) or ""
    pairs = (line.split() for line in text.splitlines())
    return {pair[0]: int(pair[1]) for pair in pairs if len(pair) == 2 and pair[1].isdigit()}


def read_usage(paths: dict[str, str], root: Path = CGROUP_ROOT) -> CgroupUsage:
    """The container's usage from its cgroup `paths` (cgroup_paths): v1 controllers first, else v2."""
    cpu_ns = cpu_limit = memory_usage = memory_limit = memory_cache = None
    if "cpuacct" in paths and (root / "cpuacct").is_dir():
        cpu_ns = _int(root / "cpuacct" / paths["cpuacct"].lstrip("/") / "cpuacct.usage")
    if "cpu" in paths and (root / "cpu").is_dir():
        cpu_dir = root / "cpu" / paths["cpu"].lstrip("/")
        quota, period = _int(cpu_dir / "cpu.cfs_quota_us"), _int(cpu_dir / "cpu.cfs_period_us")
        if quota is not None and quota > 0 and period:
            cpu_limit = quota / period
    if "memory" in paths and (root / "memory").is_dir():
        memory_dir = root / "memory" / paths["memory"].lstrip("/")
        usage = _int(memory_dir / "memory.usage_in_bytes")
        stat = _stat(memory_dir / "memory.stat")
        memory_cache = stat.get("total_cache", stat.get("cache"))
        if usage is not None:
            memory_usage = max(0, usage - (memory_cache or 0))
        limit = _int(memory_dir / "memory.limit_in_bytes")
        memory_limit = limit if limit is not None and limit < UNLIMITED_BYTES else None
    if "" in paths and (cpu_ns is None or memory_usage is None):
        unified = root / "unified" if (root / "unified").is_dir() else root
        v2_dir = unified / paths[""].lstrip("/")
        if cpu_ns is None and (usec := _stat(v2_dir / "cpu.stat").get("usage_usec")) is not None:
            cpu_ns = usec * 1000
        if cpu_limit is None and (cpu_max := _read(v2_dir / "cpu.max")):
            quota_text, _, period_text = cpu_max.partition(" ")
            if quota_text.isdigit() and period_text.isdigit() and int(period_text):
                cpu_limit = int(quota_text) / int(period_text)
        if memory_usage is None and (current := _int(v2_dir / "memory.current")) is not None:
            memory_cache = _stat(v2_dir / "memory.stat").get("file")
            memory_usage = max(0, current - (memory_cache or 0))
            maximum = _read(v2_dir / "memory.max")
            memory_limit = int(maximum) if maximum and maximum.isdigit() else None
    return CgroupUsage(cpu_ns, cpu_limit, memory_usage, memory_limit, memory_cache)


def network_bytes(pid: int, proc_root: Path = PROC_ROOT) -> tuple[int, int] | None:
    """(received, sent) bytes over the container's interfaces except loopback (`/proc/<pid>/net/dev` shows
    the network namespace of that process); None if unreadable."""
    text = _read(proc_root / str(pid) / "net" / "dev")
    if text is None:
        return None
    received = sent = 0
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() == "lo" or len(fields) < 9:
            continue
        received += int(fields[0])
        sent += int(fields[8])
    return received, sent
