"""The runner's toolbox relay against a fake daemon listening on the sandbox's unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.polling import wait_until_async
from tests.unit.runner.sockets import SANDBOX_ROOT_UID, serve_as
from tidepool_contracts.toolbox_routes import DAEMON_SPAN_HEADER
from tidepool_runner.daemon_connections import DaemonConnections
from tidepool_runner.toolbox_server import build_toolbox_app
from tidepool_runtime.admission import Admission

RUNNER_TOKEN = "runner-secret"
SANDBOX_ID = "sbx-1"
DOWNLOAD = os.urandom(10 * 1024 * 1024)
# Set by a test: `POST /process/execute` answers once it is set (a long exec).
GATE_KEY = web.AppKey("gate", asyncio.Event)


async def fake_daemon(request: web.Request) -> web.StreamResponse:
    """Stands in for the daemon on a few of the toolbox API's real routes."""
    route = (request.method, request.rel_url.path)
    if route == ("GET", "/version"):
        return web.json_response({"version": "fake-1"})
    if (
        route == ("GET", "/work-dir") and "traceparent" in request.headers
    ):  # as the daemon answers a traced call
        timing = {DAEMON_SPAN_HEADER: "start=1;end=2"}
        return web.json_response({"traceparent": request.headers["traceparent"]}, headers=timing)
    if route == ("DELETE", "/files"):
        return web.Response(status=204)
    if route == ("POST", "/process/execute"):
        await request.app[GATE_KEY].wait()
        return web.json_response({"exitCode": 0, "result": ""})
    if route == ("GET", "/files/info"):
        return web.Response(body=b"\x1f\x8bnot-really-gzip", headers={"Content-Encoding": "gzip"})
    if route == ("POST", "/files/upload-v2"):
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return web.json_response({"sha256": digest.hexdigest()})
    if route == ("GET", "/files/download"):
        response = web.StreamResponse()
        response.content_length = len(DOWNLOAD)
        await response.prepare(request)
        for offset in range(0, len(DOWNLOAD), 1 << 20):
            await response.write(DOWNLOAD[offset : offset + (1 << 20)])
        return response
    if route == ("GET", "/process/pty/pty-1/connect"):
        ws = web.WebSocketResponse(protocols=("X-Daytona-Pty-Exit-Control",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data.upper())
            elif message.data == "exit":
                await ws.close(code=1000, message=b'{"exitCode":0}')
        return ws
    return web.json_response(
        {
            "raw_path": request.rel_url.raw_path,
            "raw_query": request.rel_url.raw_query_string,
            "authorization": request.headers.get("Authorization"),
            "content_type": request.headers.get("Content-Type"),
        }
    )


@dataclass
class RunnerUnderTest:
    url: str
    sockets_dir: Path
    gate: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def runner(short_tmp: Path) -> AsyncIterator[RunnerUnderTest]:
    async with serve_runner(short_tmp, None) as serving:
        yield serving


@contextlib.asynccontextmanager
async def serve_runner(short_tmp: Path, admission: Admission | None) -> AsyncIterator[RunnerUnderTest]:
    sockets_dir = short_tmp / "sockets"
    gate = asyncio.Event()
    daemon_app = web.Application()
    daemon_app[GATE_KEY] = gate
    daemon_app.router.add_route("*", "/{path:.*}", fake_daemon)
    daemon_runner = web.AppRunner(daemon_app)
    await daemon_runner.setup()
    # As the runner prepares it: the sandbox's root owns the folder and serves the socket.
    await serve_as(SANDBOX_ROOT_UID, daemon_runner, sockets_dir / SANDBOX_ID)

    daemons = DaemonConnections(lambda sandbox_id: sockets_dir / sandbox_id)
    server = TestServer(build_toolbox_app(daemons, RUNNER_TOKEN, admission=admission), host="127.0.0.1")
    await server.start_server()
    try:
        yield RunnerUnderTest(url=str(server.make_url("")).rstrip("/"), sockets_dir=sockets_dir, gate=gate)
    finally:
        gate.set()
        await server.close()
        await daemons.close_all()
        await daemon_runner.cleanup()


AUTH = {"Authorization": f"Bearer {RUNNER_TOKEN}"}


async def test_health_and_runner_token(runner: RunnerUnderTest) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{runner.url}/health") as response:
            assert response.status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.get(
                f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox/version", headers=headers
            ) as response:
                assert response.status == 401
        async with http.get(f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox/version", headers=AUTH) as response:
            assert response.status == 200
            assert await response.json() == {"version": "fake-1"}
        # The alternative header upstream proxies use is accepted too.
        alternative = {"X-Daytona-Authorization": f"Bearer {RUNNER_TOKEN}"}
        async with http.get(
            f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox/version", headers=alternative
        ) as response:
            assert response.status == 200


async def test_the_daemons_timing_header_never_reaches_the_client(runner: RunnerUnderTest) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox/work-dir",
            headers={**AUTH, "traceparent": traceparent},
        ) as response,
    ):
        assert response.status == 200
        assert DAEMON_SPAN_HEADER not in response.headers
        # Tracing is not configured in unit tests: the caller's context passes through to the daemon.
        assert (await response.json())["traceparent"].split("-")[1] == traceparent.split("-")[1]


async def test_relays_raw_path_and_query_without_credentials(runner: RunnerUnderTest) -> None:
    url = aiohttp.client.URL(
        f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox/process/session/a%2Fb/exec?path=x%20y&n=1&n=2",
        encoded=True,
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=b"{}", headers=AUTH, skip_auto_headers=["Content-Type"]) as response,
    ):
        echoed = await response.json()
    assert echoed == {
        "raw_path": "/process/session/a%2Fb/exec",
        "raw_query": "path=x%20y&n=1&n=2",
        "authorization": None,
        "content_type": None,
    }


async def test_empty_and_encoded_bodies_pass_untouched(runner: RunnerUnderTest) -> None:
    base = f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox"
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.delete(f"{base}/files", headers=AUTH) as response:
            assert response.status == 204
            assert await response.read() == b""
        async with http.get(f"{base}/files/info", headers=AUTH) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == b"\x1f\x8bnot-really-gzip"


async def test_streams_10_mib_both_ways(runner: RunnerUnderTest) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    base = f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/files/upload-v2", data=payload, headers=AUTH) as response:
            assert (await response.json())["sha256"] == hashlib.sha256(payload).hexdigest()
        async with http.get(f"{base}/files/download", headers=AUTH) as response:
            assert response.headers["Content-Length"] == str(len(DOWNLOAD))
            assert await response.read() == DOWNLOAD


async def test_websocket_relay_keeps_subprotocol_frames_and_close(runner: RunnerUnderTest) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{runner.url}/sandboxes/{SANDBOX_ID}/toolbox/process/pty/pty-1/connect",
            headers=AUTH,
            protocols=("X-Daytona-Pty-Exit-Control",),
        ) as ws,
    ):
        assert ws.protocol == "X-Daytona-Pty-Exit-Control"
        await ws.send_bytes(b"ls\n")
        assert await ws.receive_bytes(timeout=5) == b"LS\n"
        await ws.send_str("exit")
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert (closing.data, closing.extra) == (1000, '{"exitCode":0}')


async def test_missing_socket_is_502_and_bad_id_is_404(runner: RunnerUnderTest) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{runner.url}/sandboxes/other/toolbox/version", headers=AUTH) as response:
            assert response.status == 502
            body = await response.json()
            assert body["message"] == "sandbox toolbox is not reachable"
            assert body["source"] == "DAYTONA_PROXY"
        async with http.get(f"{runner.url}/sandboxes/..%2E/toolbox/version", headers=AUTH) as response:
            assert response.status == 404


async def test_tcp_tunnel_needs_the_runner_token_a_websocket_and_a_reachable_sandbox(
    runner: RunnerUnderTest,
) -> None:
    """`/sandboxes/{id}/tcp/{port}` (the SSH gateway's `ssh -L`) refuses before any upgrade."""
    tunnel = f"{runner.url}/sandboxes/{SANDBOX_ID}/tcp/8080"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(tunnel, headers=headers)
            assert refused.value.status == 401
        async with http.get(tunnel, headers=AUTH) as response:
            assert response.status == 400  # not a WebSocket
        for port in ("0", "65536", "http"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{runner.url}/sandboxes/{SANDBOX_ID}/tcp/{port}", headers=AUTH)
            assert refused.value.status == 400
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{runner.url}/sandboxes/other/tcp/8080", headers=AUTH)
        assert refused.value.status == 502


async def test_past_capacity_the_runner_refuses_fast_and_exempts_long_lived_requests(short_tmp: Path) -> None:
    admission = Admission(2, retry_after_seconds=3, hop="runner")
    toolbox = f"/sandboxes/{SANDBOX_ID}/toolbox"
    async with serve_runner(short_tmp, admission) as runner, aiohttp.ClientSession() as http:
        execute = f"{runner.url}{toolbox}/process/execute"

        async def long_exec() -> tuple[int, dict]:
            async with http.post(execute, json={"command": "sleep 60"}, headers=AUTH) as response:
                return response.status, await response.json()

        long_execs = [asyncio.create_task(long_exec()) for _ in range(2)]
        await wait_until_async(lambda: admission.in_flight == 2, "the long execs were never admitted")

        async with http.post(execute, json={"command": "true"}, headers=AUTH) as refused:
            assert refused.status == 503
            assert refused.headers["Retry-After"] == "3"
            body = await refused.json()
        assert body["statusCode"] == 503
        assert "runner is at capacity (2 toolbox requests in flight)" in body["message"]
        async with http.get(f"{runner.url}{toolbox}/version", headers=AUTH) as refused:
            assert refused.status == 503
        assert admission.refused == 2

        # Long-lived requests pass while every slot is taken, and take none: a streamed download, an
        # upload, a log follow (a plain log read is counted), a PTY WebSocket.
        async with http.get(f"{runner.url}{toolbox}/files/download?path=x", headers=AUTH) as download:
            assert download.status == 200
            assert await download.read() == DOWNLOAD
        async with http.post(f"{runner.url}{toolbox}/files/upload-v2", data=b"abc", headers=AUTH) as upload:
            assert upload.status == 200
        logs = f"{runner.url}{toolbox}/process/session/s1/command/c1/logs"
        async with http.get(f"{logs}?follow=true", headers=AUTH) as followed:
            assert followed.status == 200
        async with http.get(logs, headers=AUTH) as read_once:
            assert read_once.status == 503
        async with http.ws_connect(
            f"{runner.url}{toolbox}/process/pty/pty-1/connect",
            headers=AUTH,
            protocols=("X-Daytona-Pty-Exit-Control",),
        ) as ws:
            await ws.send_bytes(b"ls\n")
            assert await ws.receive_bytes(timeout=5) == b"LS\n"
        assert admission.in_flight == 2

        # The admitted requests complete as if nothing had been refused; then their slots are free.
        runner.gate.set()
        assert await asyncio.gather(*long_execs) == [(200, {"exitCode": 0, "result": ""})] * 2
        assert admission.in_flight == 0
        async with http.get(f"{runner.url}{toolbox}/version", headers=AUTH) as response:
            assert response.status == 200
        assert (admission.admitted, admission.refused) == (3, 3)
