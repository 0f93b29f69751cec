"""`GET /system/metrics` (the sandbox's own CPU, memory and disk) and the listening-port endpoints.

Memory and CPU come from the container's cgroup (v2 or v1) so a sandbox reports its limits, not the host's;
without a cgroup limit the /proc values are used. Inside a container the cgroup is usually mounted at the
controller root (`/sys/fs/cgroup[/<controller>]`), while on a plain host it is the path named in
`/proc/self/cgroup`; both are tried.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import bad_request
from .httpd.http_io import Request, Response, json_response

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_ROOT = "/proc"
# cgroup v1 reports "no limit" as a huge page-rounded number; anything at or above this is unlimited.
_UNLIMITED_THRESHOLD = 1 << 60
# CPU usage is averaged since the previous metrics call when that was 0.05-10 s ago; otherwise (first
# call, or a stale sample) over a fresh window this long.
CPU_SAMPLE_SECONDS = 0.1
_MIN_WINDOW_SECONDS = 0.05
_MAX_WINDOW_SECONDS = 10.0
_TCP_LISTEN_STATE = "0A"


@dataclass(frozen=True)
class CgroupPaths:
    """Directories holding each controller's files for this process (None: not available)."""

    version: int  # 2, 1 or 0 (none)
    memory: str | None
    cpu: str | None
    cpuacct: str | None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _read_int(path: str | None) -> int | None:
    if path is None:
        return None
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _parse_flat_keyed(text: str | None) -> dict[str, int]:
    """`memory.stat` / `cpu.stat` / `/proc/meminfo` style `key value [unit]` lines."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        fields = line.replace(":", " ").split()
        if len(fields) >= 2:
            try:
                values[fields[0]] = int(fields[1])
            except ValueError:
                continue
    return values


def _own_cgroup_paths(proc_root: str) -> dict[str, str]:
    """controller -> path from /proc/self/cgroup; the v2 unified entry is keyed ""."""
    paths: dict[str, str] = {}
    for line in (_read_text(os.path.join(proc_root, "self", "cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def _first_dir_with(candidates: list[str], filename: str) -> str | None:
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, filename)):
            return candidate
    return None


def discover_cgroup(cgroup_root: str = CGROUP_ROOT, proc_root: str = PROC_ROOT) -> CgroupPaths:
    own = _own_cgroup_paths(proc_root)
    if os.path.exists(os.path.join(cgroup_root, "cgroup.controllers")):
        relative = own.get("", "/").lstrip("/")
        candidates = [os.path.join(cgroup_root, relative), cgroup_root] if relative else [cgroup_root]
        memory = _first_dir_with(candidates, "memory.max") or _first_dir_with(candidates, "memory.current")
        cpu = _first_dir_with(candidates, "cpu.stat")
        return CgroupPaths(2, memory, cpu, cpu)

    def v1(controller: str, filename: str, mount_names: tuple[str, ...]) -> str | None:
        relative = own.get(controller, "/").lstrip("/")
        candidates: list[str] = []
        for mount in mount_names:
            base = os.path.join(cgroup_root, mount)
            if relative:
                candidates.append(os.path.join(base, relative))
            candidates.append(base)
        return _first_dir_with(candidates, filename)

    memory = v1("memory", "memory.usage_in_bytes", ("memory",))
    cpu = v1("cpu", "cpu.cfs_quota_us", ("cpu", "cpu,cpuacct"))
    cpuacct = v1("cpuacct", "cpuacct.usage", ("cpuacct", "cpu,cpuacct"))
    if memory is None and cpu is None and cpuacct is None:
        return CgroupPaths(0, None, None, None)
    return CgroupPaths(1, memory, cpu, cpuacct)


@dataclass(frozen=True)
class MemoryReading:
    total: int
    used: int
    cache: int


def read_memory(cgroup: CgroupPaths, proc_root: str = PROC_ROOT) -> MemoryReading:
    meminfo = _parse_flat_keyed(_read_text(os.path.join(proc_root, "meminfo")))
    host_total = meminfo.get("MemTotal", 0) * 1024
    host_used = max(host_total - meminfo.get("MemAvailable", meminfo.get("MemFree", 0)) * 1024, 0)
    host_cache = (meminfo.get("Cached", 0) + meminfo.get("Buffers", 0)) * 1024
    if cgroup.memory is None:
        return MemoryReading(host_total, host_used, host_cache)
    if cgroup.version == 2:
        raw_limit = (_read_text(os.path.join(cgroup.memory, "memory.max")) or "max").strip()
        limit = int(raw_limit) if raw_limit.isdigit() else None
        usage = _read_int(os.path.join(cgroup.memory, "memory.current"))
        stats = _parse_flat_keyed(_read_text(os.path.join(cgroup.memory, "memory.stat")))
        cache = stats.get("file", 0)
        inactive_file = stats.get("inactive_file", 0)
    else:
        limit = _read_int(os.path.join(cgroup.memory, "memory.limit_in_bytes"))
        usage = _read_int(os.path.join(cgroup.memory, "memory.usage_in_bytes"))
        stats = _parse_flat_keyed(_read_text(os.path.join(cgroup.memory, "memory.stat")))
        cache = stats.get("total_cache", stats.get("cache", 0))
        inactive_file = stats.get("total_inactive_file", stats.get("inactive_file", 0))
    has_limit = limit is not None and 0 < limit < _UNLIMITED_THRESHOLD
    if has_limit and host_total:
        has_limit = limit < host_total  # type: ignore[operator]
    total = limit if has_limit and limit is not None else host_total
    if usage is None:
        return MemoryReading(total, host_used, host_cache)
    # The working set, as `docker stats` and the kubelet count it: reclaimable inactive page cache is
    # not "used".
    used = max(usage - inactive_file, 0)
    return MemoryReading(total, used, cache)


def cpu_limit(cgroup: CgroupPaths) -> float:
    """Usable CPUs: the CFS quota when set, else the CPUs this process may run on."""
    try:
        available = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        available = float(os.cpu_count() or 1)
    quota: float | None = None
    if cgroup.cpu is not None and cgroup.version == 2:
        fields = (_read_text(os.path.join(cgroup.cpu, "cpu.max")) or "max").split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
            quota = int(fields[0]) / int(fields[1])
    elif cgroup.cpu is not None:
        quota_us = _read_int(os.path.join(cgroup.cpu, "cpu.cfs_quota_us"))
        period_us = _read_int(os.path.join(cgroup.cpu, "cpu.cfs_period_us"))
        if quota_us is not None and period_us and quota_us > 0:
            quota = quota_us / period_us
    return min(quota, available) if quota else available


def cpu_usage_seconds(cgroup: CgroupPaths, proc_root: str = PROC_ROOT) -> float | None:
    """Cumulative CPU time used by the cgroup (or, without one, by the whole machine)."""
    if cgroup.version == 2 and cgroup.cpuacct is not None:
        usage_usec = _parse_flat_keyed(_read_text(os.path.join(cgroup.cpuacct, "cpu.stat"))).get("usage_usec")
        if usage_usec is not None:
            return usage_usec / 1e6
    elif cgroup.version == 1 and cgroup.cpuacct is not None:
        usage_ns = _read_int(os.path.join(cgroup.cpuacct, "cpuacct.usage"))
        if usage_ns is not None:
            return usage_ns / 1e9
    first = (_read_text(os.path.join(proc_root, "stat")) or "").split("\n", 1)[0].split()
    if not first or first[0] != "cpu":
        return None
    try:
        ticks = [int(value) for value in first[1:]]
    except ValueError:
        return None
    busy = sum(ticks) - sum(ticks[3:5])  # everything except idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class _CpuSampler:
    """Usage percentage over the window since the previous reading (a short fresh window if none)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, float] | None = None  # (monotonic time, cumulative cpu seconds)

    def percent(self, cgroup: CgroupPaths, limit: float, proc_root: str = PROC_ROOT) -> float:
        with self._lock:
            previous = self._last
            now, usage = time.monotonic(), cpu_usage_seconds(cgroup, proc_root)
            if usage is None:
                return 0.0
            if previous is None or not _MIN_WINDOW_SECONDS <= now - previous[0] <= _MAX_WINDOW_SECONDS:
                previous = (now, usage)
                time.sleep(CPU_SAMPLE_SECONDS)
                now, usage = time.monotonic(), cpu_usage_seconds(cgroup, proc_root) or usage
            self._last = (now, usage)
        elapsed = now - previous[0]
        if elapsed <= 0 or limit <= 0:
            return 0.0
        percent = (usage - previous[1]) / (elapsed * limit) * 100.0
        return round(min(max(percent, 0.0), 100.0), 2)


_cpu_sampler = _CpuSampler()


def collect_metrics(
    cgroup_root: str = CGROUP_ROOT, proc_root: str = PROC_ROOT, disk_path: str = "/"
) -> dict[str, Any]:
    cgroup = discover_cgroup(cgroup_root, proc_root)
    limit = cpu_limit(cgroup)
    memory = read_memory(cgroup, proc_root)
    cpu_percent = _cpu_sampler.percent(cgroup, limit, proc_root)
    disk = os.statvfs(disk_path)
    disk_total = disk.f_blocks * disk.f_frsize
    disk_free = disk.f_bavail * disk.f_frsize
    disk_used = max(disk.f_blocks - disk.f_bfree, 0) * disk.f_frsize
    moment = datetime.now(UTC)
    return {
        "cpuCount": max(math.ceil(limit - 1e-9), 1),
        "cpuUsedPct": float(cpu_percent),
        "memTotal": int(memory.total),
        "memUsed": int(memory.used),
        "memCache": int(memory.cache),
        "diskTotal": int(disk_total),
        "diskUsed": int(disk_used),
        "diskFree": int(disk_free),
        "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "timestampUnix": int(moment.timestamp()),
    }


def listening_tcp_ports(proc_root: str = PROC_ROOT) -> list[int]:
    """Ports with a socket in LISTEN state in this network namespace (IPv4 and IPv6)."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        text = _read_text(os.path.join(proc_root, "net", name))
        for line in (text or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _TCP_LISTEN_STATE:
                continue
            _, _, port_hex = fields[1].rpartition(":")
            try:
                ports.add(int(port_hex, 16))
            except ValueError:
                continue
    return sorted(ports)


class SystemService:
    def metrics(self, request: Request) -> Response:
        return json_response(200, collect_metrics())

    def ports(self, request: Request) -> Response:
        return json_response(200, {"ports": listening_tcp_ports()})

    def port_in_use(self, request: Request) -> Response:
        raw_port = request.path_params.get("port", "")
        if not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
            raise bad_request(f"port must be an integer between 1 and 65535, got {raw_port!r}")
        return json_response(200, {"isInUse": int(raw_port) in listening_tcp_ports()})
