"""`make bench` (hops): where a toolbox round trip spends its time, hop by hop.

The SDK figures of `bench_process` add up the SDK client, the proxy, the runner and the daemon; on a busy
machine they swing by tens of percent between runs. This bench sends the same operation three ways, one
after the other in every round so that load spikes hit all three alike:

- `daemon`: straight to the sandbox's toolbox socket (the daemon alone);
- `runner`: to the runner's toolbox relay (runner + daemon);
- `proxy`: to the proxy (proxy + runner + daemon; what the SDK talks to).

The differences of the medians are the cost of each hop (`runner hop`, `proxy hop`). It also prints the
CPU time the proxy and the runner processes spent per operation (from /proc, Linux), which noise on a
shared machine moves far less than latency. Operations: a session exec of `true` (HTTP) and a PTY
keystroke echo plus its erase (two websocket round trips).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from daytona import Daytona
from websockets.sync.client import ClientConnection, connect, unix_connect

from tests.integration.stackthread import StackThread

HOP_ROUNDS = int(os.environ.get("BENCH_HOP_ROUNDS", "200"))
WARM_ROUNDS = 20
READ_TIMEOUT_SECONDS = 10.0
HOPS = ("daemon", "runner", "proxy")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("daemon")
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def _process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far (schedstat: nanoseconds on the CPU)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
    except OSError:
        pass
    return total


class _Targets:
    def __init__(self, stack: StackThread, sandbox_id: str, api_key: str) -> None:
        env = stack.stack.env
        self.sandbox_id = sandbox_id
        self.socket_path = str(next(Path(stack.data_dir).rglob(f"{sandbox_id}/toolbox.sock")))
        self.runner_port = int(env["TIDEPOOL_RUNNER_PORT"])
        self.proxy_port = int(env["TIDEPOOL_PROXY_PORT"])
        self.headers = {
            "daemon": {},
            "runner": {"Authorization": f"Bearer {env['TIDEPOOL_RUNNER_TOKEN']}"},
            "proxy": {"Authorization": f"Bearer {api_key}"},
        }
        self.prefix = {
            "daemon": "",
            "runner": f"/sandboxes/{sandbox_id}/toolbox",
            "proxy": f"/toolbox/{sandbox_id}",
        }
        self.pids = {name: stack.stack.children[name].process.pid for name in ("proxy", "runner")}

    def http(self, hop: str) -> http.client.HTTPConnection:
        if hop == "daemon":
            return _UnixHTTPConnection(self.socket_path)
        port = self.runner_port if hop == "runner" else self.proxy_port
        return http.client.HTTPConnection("127.0.0.1", port)

    def websocket(self, hop: str, path: str) -> ClientConnection:
        url_path = self.prefix[hop] + path
        if hop == "daemon":
            return unix_connect(self.socket_path, uri=f"ws://daemon{url_path}")
        port = self.runner_port if hop == "runner" else self.proxy_port
        return connect(f"ws://127.0.0.1:{port}{url_path}", additional_headers=self.headers[hop])

    def cpu(self) -> dict[str, int]:
        return {name: _process_cpu_ns(pid) for name, pid in self.pids.items()}


def _interleaved(operations: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {hop: [] for hop in operations}
    for round_index in range(rounds + WARM_ROUNDS):
        for hop, operation in operations.items():
            started = time.perf_counter()
            operation()
            if round_index >= WARM_ROUNDS:
                samples[hop].append((time.perf_counter() - started) * 1000)
    return samples


def _cpu_per_operation(targets: _Targets, action: Callable[[], None], count: int) -> dict[str, float]:
    before = targets.cpu()
    action()
    after = targets.cpu()
    return {name: (after[name] - before[name]) / count / 1e6 for name in after}


def _lines(name: str, samples: dict[str, list[float]], cpu_ms: dict[str, float]) -> list[str]:
    medians = {hop: statistics.median(values) for hop, values in samples.items()}
    return [
        f"{name + ' (' + hop + ')':<40} n={len(samples[hop]):<4} median={medians[hop]:7.2f} ms"
        for hop in HOPS
    ] + [
        f"{name + ' hops':<40} runner hop={medians['runner'] - medians['daemon']:6.2f} ms  "
        f"proxy hop={medians['proxy'] - medians['runner']:6.2f} ms  "
        f"cpu/op via proxy: proxy={cpu_ms['proxy']:.2f} ms runner={cpu_ms['runner']:.2f} ms"
    ]


def _session_exec(targets: _Targets) -> list[str]:
    body = json.dumps({"command": "true"}).encode()
    connections = {hop: targets.http(hop) for hop in HOPS}

    def call(hop: str, method: str, path: str, payload: bytes | None) -> None:
        connection = connections[hop]
        headers = {"Content-Type": "application/json", **targets.headers[hop]}
        connection.request(method, targets.prefix[hop] + path, body=payload, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{hop} {method} {path}: {response.status} {answer[:200]!r}")

    call("daemon", "POST", "/process/session", json.dumps({"sessionId": "bench-hops"}).encode())
    exec_path = "/process/session/bench-hops/exec"
    operations = {hop: (lambda hop=hop: call(hop, "POST", exec_path, body)) for hop in HOPS}
    samples = _interleaved(operations, HOP_ROUNDS)
    cpu_ms = _cpu_per_operation(
        targets, lambda: [operations["proxy"]() for _ in range(HOP_ROUNDS)], HOP_ROUNDS
    )
    call("daemon", "DELETE", "/process/session/bench-hops", None)
    for connection in connections.values():
        connection.close()
    return _lines("session exec(true)", samples, cpu_ms)


def _read_until(websocket: ClientConnection, needle: bytes) -> None:
    seen = b""
    while needle not in seen:
        message = websocket.recv(timeout=READ_TIMEOUT_SECONDS)
        seen = seen[-64:] + (message if isinstance(message, bytes) else message.encode())


def _pty_echo(targets: _Targets) -> list[str]:
    sockets = {
        hop: targets.websocket(hop, f"/process/pty/create-connect?id=bench-hops-{hop}&cols=200&rows=24")
        for hop in HOPS
    }
    for websocket in sockets.values():
        websocket.send("PS1='ready> '\n")
        _read_until(websocket, b"ready> ")

    def echo(hop: str) -> None:
        websocket = sockets[hop]
        websocket.send(b"x")
        _read_until(websocket, b"x")
        websocket.send(b"\x7f")  # erase it again so the line never wraps
        _read_until(websocket, b"\b")

    operations = {hop: (lambda hop=hop: echo(hop)) for hop in HOPS}
    samples = _interleaved(operations, HOP_ROUNDS)
    cpu_ms = _cpu_per_operation(targets, lambda: [echo("proxy") for _ in range(HOP_ROUNDS)], HOP_ROUNDS)
    for websocket in sockets.values():
        websocket.send("exit\n")
        websocket.close()
    return _lines("PTY echo+erase", samples, cpu_ms)


def bench_hops(daytona: Daytona, stack: StackThread) -> list[str]:
    sandbox = daytona.create()
    try:
        sandbox.process.exec("true")
        targets = _Targets(stack, sandbox.id, stack.api_key)
        return _session_exec(targets) + _pty_echo(targets)
    finally:
        daytona.delete(sandbox)


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack([("hops", bench_hops)])


if __name__ == "__main__":
    main()
