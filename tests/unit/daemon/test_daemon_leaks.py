"""No leaked descriptors, threads or zombie children after many execs, sessions and PTYs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
from websockets.sync.client import unix_connect

from tests.polling import wait_until
from tests.unit.daemon.conftest import daemon_pids


def snapshot(pid: int) -> tuple[int, int, int]:
    """(open fds, threads, zombie children) of the daemon."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    zombies = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] == "Z" and int(fields[1]) == pid:
            zombies += 1
    return fds, threads, zombies


def settled_snapshot(pid: int, baseline: tuple[int, int, int]) -> tuple[int, int, int]:
    """Threads and fds wind down asynchronously (pump threads, closing connections): the first snapshot
    within the bounds, or the last one seen when they never get there (the caller's asserts then fail)."""

    def within_bounds() -> tuple[int, int, int] | None:
        current = snapshot(pid)
        fds, threads, zombies = current
        return current if fds <= baseline[0] + 4 and threads <= baseline[1] + 2 and zombies == 0 else None

    try:
        return wait_until(within_bounds, timeout=30)
    except AssertionError:
        return snapshot(pid)


def quiet_snapshot(pid: int) -> tuple[int, int, int]:
    """A baseline once the warm-up's transient threads and fds are gone: no zombies, and the same value on two
    polls in a row."""
    previous: list[tuple[int, int, int]] = []

    def stable() -> tuple[int, int, int] | None:
        current = snapshot(pid)
        settled = previous[-1:] == [current] and current[2] == 0
        previous.append(current)
        return current if settled else None

    return wait_until(stable, "the daemon's threads and fds never settled after the warm-up", interval=0.2)


def pty_cycle(socket_path: Path, client: httpx.Client, index: int) -> None:
    uri = f"ws://daemon/process/pty/create-connect?id=leak-{index}"
    with unix_connect(str(socket_path), uri, subprotocols=["X-Daytona-Pty-Exit-Control"]) as ws:  # type: ignore[list-item]
        assert json.loads(ws.recv(timeout=10))["status"] == "connected"
        if index % 2:
            ws.send(b"exit\n")
            while True:
                message = ws.recv(timeout=10)
                if isinstance(message, str) and '"exited"' in message:
                    break
    if index % 2 == 0:
        assert client.delete(f"/process/pty/leak-{index}").status_code == 200


def test_no_fd_thread_or_zombie_leaks(daemon_client: httpx.Client, daemon_socket: Path) -> None:
    _supervisor, pid = daemon_pids(daemon_socket)  # the worker serves the requests
    # Warm up every code path once so lazily created state (drainer thread, caches) is in the baseline.
    daemon_client.post("/process/execute", json={"command": "echo warm"})
    daemon_client.post("/process/session", json={"sessionId": "warm"})
    daemon_client.post("/process/session/warm/exec", json={"command": "echo warm"})
    daemon_client.delete("/process/session/warm")
    pty_cycle(daemon_socket, daemon_client, 0)
    baseline = quiet_snapshot(pid)
    assert baseline[2] == 0

    for index in range(1000):
        body = daemon_client.post("/process/execute", json={"command": f"echo {index}"}).json()
        assert body["result"] == f"{index}\n"
    for index in range(100):
        session_id = f"leak-{index}"
        assert daemon_client.post("/process/session", json={"sessionId": session_id}).status_code == 201
        body = daemon_client.post(
            f"/process/session/{session_id}/exec", json={"command": "echo a; echo b >&2"}
        ).json()
        assert body["stdout"] == "a\n"
        if index % 10 == 0:  # some with an async command still running at delete time
            daemon_client.post(
                f"/process/session/{session_id}/exec", json={"command": "sleep 5", "runAsync": True}
            )
        assert daemon_client.delete(f"/process/session/{session_id}").status_code == 204
    for index in range(1, 21):
        pty_cycle(daemon_socket, daemon_client, index)

    fds, threads, zombies = settled_snapshot(pid, baseline)
    assert zombies == 0
    assert fds <= baseline[0] + 4, (baseline, fds, sorted(os.listdir(f"/proc/{pid}/fd")))
    assert threads <= baseline[1] + 2, (baseline, threads)
    assert daemon_client.get("/process/session").json() == []
    assert daemon_client.get("/process/pty").json() == {"sessions": []}
