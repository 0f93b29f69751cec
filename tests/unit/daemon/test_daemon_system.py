"""`/env`, `/init`, `/system/metrics` and `/port` on the real daemon; cgroup readers on fake trees."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tidepool_daemon import system
from tidepool_daemon.environment import effective_environment, reset_environment, update_environment

GIB = 1024**3


# ----- /env and /init ------------------------------------------------------------------------------------


def _exec(client: httpx.Client, command: str, **extra: object) -> str:
    response = client.post("/process/execute", json={"command": command, **extra})
    assert response.status_code == 200, response.text
    return response.json()["result"]


def test_update_env_applies_to_later_execs(
    daemon_client: httpx.Client, container_env_marker: tuple[str, str]
) -> None:
    marker_name, marker_value = container_env_marker
    # The SDK sends this body without a Content-Type header.
    response = daemon_client.post(
        "/env",
        content=b'{"set": {"TP_NEW": "hello world", "TP_OTHER": "2"}, "unset": ["'
        + marker_name.encode()
        + b'"]}',
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"TP_NEW": "hello world", "TP_OTHER": "2", marker_name: None}

    assert _exec(daemon_client, 'printf "%s|%s|%s" "$TP_NEW" "$TP_OTHER" "${' + marker_name + '-unset}"') == (
        "hello world|2|unset"
    )
    # Per-command envs still win over the daemon-wide ones.
    assert _exec(daemon_client, 'printf "%s" "$TP_NEW"', envs={"TP_NEW": "per-call"}) == "per-call"

    # Setting the same value again changes nothing; setting it back restores it.
    assert daemon_client.post("/env", content=b'{"set": {"TP_OTHER": "2"}}').json() == {}
    again = daemon_client.post("/env", json={"set": {marker_name: marker_value}, "unset": ["TP_OTHER"]})
    assert again.json() == {marker_name: marker_value, "TP_OTHER": None}
    assert _exec(daemon_client, f'printf "%s" "${marker_name}"') == marker_value


def test_update_env_unset_value_prefix(daemon_client: httpx.Client) -> None:
    daemon_client.post("/env", json={"set": {"TP_SECRET_A": "ph:1", "TP_SECRET_B": "ph:2", "TP_KEEP": "x"}})
    response = daemon_client.post("/env", json={"set": {"TP_SECRET_B": "ph:new"}, "unsetValuePrefix": "ph:"})
    assert response.json() == {"TP_SECRET_A": None, "TP_SECRET_B": "ph:new"}
    assert _exec(daemon_client, 'printf "%s|%s|%s" "${TP_SECRET_A-gone}" "$TP_SECRET_B" "$TP_KEEP"') == (
        "gone|ph:new|x"
    )


@pytest.mark.parametrize(
    "body",
    [b"[1]", b"{not json", b'{"set": {"A": 1}}', b'{"set": {"A=B": "x"}}', b'{"unset": "A"}', b'{"set": []}'],
)
def test_update_env_rejects_bad_bodies(daemon_client: httpx.Client, body: bytes) -> None:
    response = daemon_client.post("/env", content=body)
    assert response.status_code == 400
    assert response.json()["source"] == "DAYTONA_DAEMON"


def test_update_env_empty_body_is_a_no_op(daemon_client: httpx.Client) -> None:
    assert daemon_client.post("/env").json() == {}


def test_init(daemon_client: httpx.Client) -> None:
    response = daemon_client.post("/init", content=b'{"token": "abc"}')
    assert response.status_code == 200 and response.json() == {}
    assert daemon_client.post("/init").json() == {}
    assert daemon_client.post("/init", content=b'{"token": 5}').status_code == 400


def test_effective_environment_in_process() -> None:
    reset_environment()
    try:
        base = {"A": "1", "B": "2"}
        update_environment({"P": "ph:x", "Q": "ph:y"})
        # The prefix is applied to the daemon's current environment (start-up env plus overrides).
        changes = update_environment({"C": "3", "Q": "ph:z"}, ["A"], unset_value_prefix="ph:")
        assert changes["C"] == "3" and changes["P"] is None and changes["Q"] == "ph:z"
        assert effective_environment(base) == {"B": "2", "C": "3", "Q": "ph:z"}
        update_environment(unset=["Q"])

        class Context:
            base_env = {"B": "b"}

        assert effective_environment(Context()) == {"B": "b", "C": "3"}
        result = effective_environment(base)
        result["mutated"] = "yes"
        assert "mutated" not in effective_environment(base)
    finally:
        reset_environment()


# ----- metrics -------------------------------------------------------------------------------------------


def test_system_metrics_shape(daemon_client: httpx.Client) -> None:
    response = daemon_client.get("/system/metrics")
    assert response.status_code == 200
    metrics = response.json()
    for name in (
        "cpuCount",
        "memTotal",
        "memUsed",
        "memCache",
        "diskTotal",
        "diskUsed",
        "diskFree",
        "timestampUnix",
    ):
        assert isinstance(metrics[name], int) and metrics[name] >= 0, name
    assert isinstance(metrics["cpuUsedPct"], float) and 0 <= metrics["cpuUsedPct"] <= 100
    assert metrics["cpuCount"] >= 1 and metrics["memTotal"] > 0 and metrics["diskTotal"] > 0
    assert metrics["diskUsed"] + metrics["diskFree"] <= metrics["diskTotal"]
    stamp = datetime.fromisoformat(metrics["timestamp"].replace("Z", "+00:00"))
    assert abs(stamp.timestamp() - time.time()) < 30
    assert abs(metrics["timestampUnix"] - time.time()) < 30
    statvfs = os.statvfs("/")
    assert metrics["diskTotal"] == statvfs.f_blocks * statvfs.f_frsize


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    _write(
        proc / "meminfo",
        "MemTotal:       16384000 kB\nMemFree:  1000 kB\nMemAvailable:   8192000 kB\n"
        "Buffers: 100 kB\nCached:  900 kB\n",
    )
    _write(proc / "stat", "cpu  100 0 100 1000 0 0 0 0 0 0\ncpu0 1 2 3\n")
    return proc


def test_cgroup_v1_container_layout(tmp_path: Path, fake_proc: Path) -> None:
    root = tmp_path / "cg1"
    # Like runc on cgroup v1: the container's own cgroup is mounted at the controller root, while
    # /proc/self/cgroup still names the host path (which does not exist inside).
    _write(
        fake_proc / "self" / "cgroup",
        "4:memory:/libpod_parent/libpod-abc\n2:cpuacct:/libpod_parent/x\n1:cpu:/libpod_parent/x\n",
    )
    _write(root / "memory" / "memory.limit_in_bytes", f"{GIB}\n")
    _write(root / "memory" / "memory.usage_in_bytes", "300000000\n")
    _write(
        root / "memory" / "memory.stat",
        "cache 5000\ninactive_file 7\ntotal_cache 120000000\ntotal_inactive_file 100000000\n",
    )
    _write(root / "cpu" / "cpu.cfs_quota_us", "150000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpuacct" / "cpuacct.usage", "2500000000\n")

    cgroup = system.discover_cgroup(str(root), str(fake_proc))
    assert cgroup.version == 1 and cgroup.memory == str(root / "memory")
    memory = system.read_memory(cgroup, str(fake_proc))
    assert (memory.total, memory.used, memory.cache) == (GIB, 200_000_000, 120_000_000)
    assert system.cpu_limit(cgroup) == min(1.5, len(os.sched_getaffinity(0)))
    assert system.cpu_usage_seconds(cgroup, str(fake_proc)) == 2.5


def test_cgroup_v1_unlimited_falls_back_to_host(tmp_path: Path, fake_proc: Path) -> None:
    root = tmp_path / "cg1"
    _write(fake_proc / "self" / "cgroup", "4:memory:/\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory" / "memory.usage_in_bytes", "1000\n")
    _write(root / "memory" / "memory.stat", "total_cache 10\n")
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    cgroup = system.discover_cgroup(str(root), str(fake_proc))
    assert system.read_memory(cgroup, str(fake_proc)).total == 16384000 * 1024
    assert system.cpu_limit(cgroup) == len(os.sched_getaffinity(0))


def test_cgroup_v2_nested_path(tmp_path: Path, fake_proc: Path) -> None:
    root = tmp_path / "cg2"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(fake_proc / "self" / "cgroup", "0::/system.slice/sandbox.scope\n")
    own = root / "system.slice" / "sandbox.scope"
    _write(own / "memory.max", f"{2 * GIB}\n")
    _write(own / "memory.current", "500000000\n")
    _write(own / "memory.stat", "anon 1\nfile 300000000\ninactive_file 200000000\n")
    _write(own / "cpu.max", "50000 100000\n")
    _write(own / "cpu.stat", "usage_usec 4000000\nuser_usec 1\n")
    cgroup = system.discover_cgroup(str(root), str(fake_proc))
    assert cgroup.version == 2 and cgroup.memory == str(own)
    memory = system.read_memory(cgroup, str(fake_proc))
    assert (memory.total, memory.used, memory.cache) == (2 * GIB, 300_000_000, 300_000_000)
    assert system.cpu_limit(cgroup) == 0.5
    assert system.cpu_usage_seconds(cgroup, str(fake_proc)) == 4.0


def test_cgroup_v2_max_and_no_cgroup(tmp_path: Path, fake_proc: Path) -> None:
    root = tmp_path / "cg2"
    _write(root / "cgroup.controllers", "")
    _write(fake_proc / "self" / "cgroup", "0::/\n")
    _write(root / "memory.max", "max\n")
    _write(root / "memory.current", "10\n")
    _write(root / "cpu.max", "max 100000\n")
    cgroup = system.discover_cgroup(str(root), str(fake_proc))
    assert system.read_memory(cgroup, str(fake_proc)).total == 16384000 * 1024

    nothing = system.discover_cgroup(str(tmp_path / "empty"), str(fake_proc))
    assert nothing.version == 0
    memory = system.read_memory(nothing, str(fake_proc))
    assert (memory.total, memory.used) == (16384000 * 1024, (16384000 - 8192000) * 1024)
    ticks = os.sysconf("SC_CLK_TCK")
    assert system.cpu_usage_seconds(nothing, str(fake_proc)) == 200 / ticks


# ----- ports ---------------------------------------------------------------------------------------------


def test_ports_list_and_in_use(daemon_client: httpx.Client) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ports = daemon_client.get("/port").json()["ports"]
        assert port in ports and all(isinstance(item, int) for item in ports)
        assert daemon_client.get(f"/port/{port}/in-use").json() == {"isInUse": True}
    assert daemon_client.get(f"/port/{port}/in-use").json() == {"isInUse": False}
    assert daemon_client.get("/port/70000/in-use").status_code == 400
    assert daemon_client.get("/port/abc/in-use").status_code == 400


def test_listening_ports_parser(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    header = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    _write(
        proc / "net" / "tcp",
        header + "   0: 0100007F:1F90 00000000:0000 0A 0\n   1: 0100007F:C350 0100007F:1F90 01 0\n",
    )
    _write(proc / "net" / "tcp6", header + "   0: 00000000000000000000000000000000:0050 000:0 0A 0\n")
    assert system.listening_tcp_ports(str(proc)) == [80, 8080]
