"""`make bench BENCH_ONLY=previews`: a request to a web server in a sandbox, through its preview URL.

The server (stdlib, HTTP/1.1 keep-alive, answers `ok`) runs in the sandbox. The same `GET /` is sent,
interleaved round by round so load spikes hit all alike:

- `direct`: from inside the sandbox to 127.0.0.1 (a script run there times its own requests): the server
  alone, the floor;
- `daemon tunnel`: from the host through the sandbox daemon's `CONNECT` tunnel (daemon + server);
- `runner`: to the runner's preview relay (runner + daemon + server);
- `proxy`: to the preview URL the API returned, with the preview token (what a user's client does).

Ratios are to `direct`. Plus the WebSocket echo round trip through the preview URL (a stdlib echo server).
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
from urllib.parse import urlsplit

from daytona import Daytona, SessionExecuteRequest
from websockets.sync.client import connect

from tests.integration.stackthread import StackThread
from tests.integration.test_previews_sdk import WS_ECHO, WS_PORT

ROUNDS = int(os.environ.get("BENCH_PREVIEW_ROUNDS", "300"))
WARM_ROUNDS = 20
WEB_PORT = 3000
TOKEN_HEADER = "X-Daytona-Preview-Token"

SERVER = r"""
import http.server
class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response, no Nagle: else the 40 ms of Nagle + delayed ACK measure this toy server.
    wbufsize = 65536
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 3000), Ok).serve_forever()
"""

# Run inside the sandbox: times ROUNDS keep-alive GETs to the server, prints the samples (ms) as JSON.
DIRECT = r"""
import http.client, json, sys, time
rounds = int(sys.argv[1])
connection = http.client.HTTPConnection("127.0.0.1", 3000)
samples = []
for index in range(rounds + 20):
    started = time.perf_counter()
    connection.request("GET", "/")
    connection.getresponse().read()
    if index >= 20:
        samples.append((time.perf_counter() - started) * 1000)
print(json.dumps(samples))
"""


class _TunnelConnection(http.client.HTTPConnection):
    """HTTP over the daemon's CONNECT tunnel to a port in the sandbox."""

    def __init__(self, socket_path: str, port: int) -> None:
        super().__init__("localhost", port)
        self._socket_path = socket_path
        self._target_port = port

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._socket_path)
        target = f"localhost:{self._target_port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"tunnel refused: {head!r}")
        self.sock = sock


def _summary(name: str, samples: list[float], floor: float | None) -> str:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    ratio = f"  ratio to direct={median / floor:6.1f}x" if floor else ""
    return f"{name:<36} n={len(ordered):<4} median={median:7.2f} ms  p95={p95:7.2f} ms{ratio}"


def _start(sandbox: object, command: str, name: str) -> None:
    process = sandbox.process  # type: ignore[attr-defined]
    process.create_session(name)
    process.execute_session_command(name, SessionExecuteRequest(command=command, run_async=True))


def bench_previews(daytona: Daytona, stack: StackThread) -> list[str]:
    sandbox = daytona.create()
    try:
        sandbox.fs.upload_file(SERVER.encode(), "/home/daytona/ok_server.py")
        sandbox.fs.upload_file(DIRECT.encode(), "/home/daytona/direct.py")
        sandbox.fs.upload_file(WS_ECHO.encode(), "/home/daytona/ws_echo.py")
        _start(sandbox, "python3 /home/daytona/ok_server.py", "bench-web")
        _start(sandbox, "python3 /home/daytona/ws_echo.py", "bench-ws")
        for port in (WEB_PORT, WS_PORT):
            probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\""
            deadline = time.monotonic() + 30
            while sandbox.process.exec(probe).exit_code != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listens on {port}")
                time.sleep(0.1)

        link = sandbox.get_preview_link(WEB_PORT)
        env = stack.stack.env
        socket_path = str(next(Path(stack.data_dir).rglob(f"{sandbox.id}/toolbox.sock")))
        preview = urlsplit(link.url)
        connections: dict[str, Callable[[], http.client.HTTPConnection]] = {
            "daemon tunnel": lambda: _TunnelConnection(socket_path, WEB_PORT),
            "runner": lambda: http.client.HTTPConnection("127.0.0.1", int(env["TIDEPOOL_RUNNER_PORT"])),
            "proxy": lambda: http.client.HTTPConnection("127.0.0.1", preview.port),
        }
        paths = {"daemon tunnel": "/", "runner": f"/sandboxes/{sandbox.id}/ports/{WEB_PORT}/", "proxy": "/"}
        headers = {
            "daemon tunnel": {},
            "runner": {"X-Daytona-Authorization": f"Bearer {env['TIDEPOOL_RUNNER_TOKEN']}"},
            "proxy": {"Host": preview.netloc, TOKEN_HEADER: link.token},
        }
        open_connections = {hop: make() for hop, make in connections.items()}
        samples: dict[str, list[float]] = {hop: [] for hop in connections}
        for index in range(ROUNDS + WARM_ROUNDS):
            for hop, connection in open_connections.items():
                started = time.perf_counter()
                connection.request("GET", paths[hop], headers=headers[hop])
                response = connection.getresponse()
                body = response.read()
                elapsed = (time.perf_counter() - started) * 1000
                if response.status != 200 or body != b"ok":
                    raise RuntimeError(f"{hop}: {response.status} {body[:200]!r}")
                if index >= WARM_ROUNDS:
                    samples[hop].append(elapsed)
        for connection in open_connections.values():
            connection.close()
        direct = json.loads(sandbox.process.exec(f"python3 /home/daytona/direct.py {ROUNDS}").result)
        floor = statistics.median(direct)

        ws_link = sandbox.get_preview_link(WS_PORT)
        rtt: list[float] = []
        with connect(
            ws_link.url.replace("http://", "ws://") + "/", additional_headers={TOKEN_HEADER: ws_link.token}
        ) as ws:
            for index in range(ROUNDS + WARM_ROUNDS):
                started = time.perf_counter()
                ws.send(f"ping {index}")
                if ws.recv(timeout=10) != f"ping {index}":
                    raise RuntimeError("the WebSocket echo answered something else")
                if index >= WARM_ROUNDS:
                    rtt.append((time.perf_counter() - started) * 1000)
        return [
            _summary("preview GET / (direct, in sandbox)", direct, None),
            *(_summary(f"preview GET / ({hop})", samples[hop], floor) for hop in connections),
            _summary("preview WebSocket echo RTT (proxy)", rtt, None),
        ]
    finally:
        daytona.delete(sandbox)


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack([("previews", bench_previews)])


if __name__ == "__main__":
    main()
