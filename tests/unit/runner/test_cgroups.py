"""Reading a container's CPU and memory from cgroup files: v1 controllers (this host) and v2 (unified)."""

from __future__ import annotations

from pathlib import Path

from tidepool_runner.cgroups import cgroup_paths, network_bytes, read_usage

GROUP = "/libpod_parent/libpod-abc"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_controllers(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "42" / "cgroup", f"4:memory:{GROUP}\n2:cpuacct:{GROUP}\n1:cpu:{GROUP}\n0::{GROUP}\n")
    write(root / "cpuacct" / GROUP[1:] / "cpuacct.usage", "37998193\n")
    write(root / "cpu" / GROUP[1:] / "cpu.cfs_quota_us", "200000\n")
    write(root / "cpu" / GROUP[1:] / "cpu.cfs_period_us", "100000\n")
    write(root / "memory" / GROUP[1:] / "memory.usage_in_bytes", "1000000\n")
    write(root / "memory" / GROUP[1:] / "memory.limit_in_bytes", "536870912\n")
    write(root / "memory" / GROUP[1:] / "memory.stat", "cache 4096\ntotal_cache 8192\nrss 900000\n")
    usage = read_usage(cgroup_paths(42, proc), root)
    assert usage.cpu_ns == 37998193
    assert usage.cpu_limit == 2.0
    assert (usage.memory_usage, usage.memory_cache, usage.memory_limit) == (1000000 - 8192, 8192, 536870912)


def test_cgroup_v2_unified(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "7" / "cgroup", f"0::{GROUP}\n")
    write(root / GROUP[1:] / "cpu.stat", "usage_usec 1500\nuser_usec 1000\n")
    write(root / GROUP[1:] / "cpu.max", "max 100000\n")
    write(root / GROUP[1:] / "memory.current", "2048000\n")
    write(root / GROUP[1:] / "memory.max", "max\n")
    write(root / GROUP[1:] / "memory.stat", "anon 1000\nfile 48000\n")
    usage = read_usage(cgroup_paths(7, proc), root)
    assert usage.cpu_ns == 1_500_000
    assert usage.cpu_limit is None  # unlimited
    assert (usage.memory_usage, usage.memory_cache, usage.memory_limit) == (2000000, 48000, None)


def test_missing_controllers_give_none_and_network_skips_loopback(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write(proc / "9" / "cgroup", f"4:memory:{GROUP}\n")
    usage = read_usage(cgroup_paths(9, proc), tmp_path / "empty")
    assert usage.cpu_ns is None and usage.memory_usage is None
    write(
        proc / "9" / "net" / "dev",
        "Inter-| Receive | Transmit\n face |bytes packets ...\n"
        "    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n"
        "  eth0: 560 6 0 0 0 0 0 0 292 4 0 0 0 0 0 0\n",
    )
    assert network_bytes(9, proc) == (560, 292)
