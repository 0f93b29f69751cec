"""Fixtures for the proxy tests: a private JetStream nats-server, a fake runner, the proxy app in-process."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tidepool_proxy.app import create_proxy_app
from tidepool_runtime.broker import Bus, connect
from tidepool_runtime.settings import Settings

RUNNER_TOKEN = "test-runner-token"
# The key the API seals signing keys with for this proxy (tidepool_runtime.sealing).
SIGNING_SEAL_KEY = "test-signing-seal-key"
DOWNLOAD_SIZE = 10 * 1024 * 1024


@pytest.fixture(scope="session")
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    connected = await connect(nats_url, name="proxy-tests")
    yield connected
    await connected.close()


def download_payload() -> bytes:
    # Not compressible and not periodic at any small offset: catches dropped, duplicated or reordered chunks.
    blocks = [hashlib.sha256(str(index).encode()).digest() for index in range(DOWNLOAD_SIZE // 32)]
    return b"".join(blocks)


class FakeRunner:
    """Stands in for a runner's toolbox endpoint (on a few of the toolbox API's real routes) and records
    what reached it."""

    def __init__(self) -> None:
        self.download = download_payload()
        self.requests: list[dict[str, object]] = []
        # Each WebSocket handshake's (Sec-WebSocket-Protocol, Authorization) as the runner received them.
        self.websocket_handshakes: list[tuple[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/sandboxes/{sandbox_id}/toolbox/{path:.*}", self.handle)
        app.router.add_route("*", "/sandboxes/{sandbox_id}/ports/{port}/{path:.*}", self.preview)
        return app

    async def preview(self, request: web.Request) -> web.StreamResponse:
        """A preview request as the runner gets it: echo what arrived, with the CORS the app chose."""
        if request.headers.get("X-Daytona-Authorization") != f"Bearer {RUNNER_TOKEN}":
            return web.json_response({"message": "bad runner token"}, status=401)
        answer = web.json_response(
            {
                "raw_path": request.rel_url.raw_path,
                "raw_query": request.rel_url.raw_query_string,
                "headers": dict(request.headers),
            }
        )
        if request.query.get("app_cors") == "star":
            answer.headers["Access-Control-Allow-Origin"] = "*"
            answer.headers["Access-Control-Allow-Credentials"] = "true"
        return answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {RUNNER_TOKEN}":
            return web.json_response({"message": "bad runner token"}, status=401)
        path = request.match_info["path"]
        self.requests.append(
            {
                "method": request.method,
                "raw_path": request.rel_url.raw_path,
                "raw_query": request.rel_url.raw_query_string,
                "headers": dict(request.headers),
            }
        )
        if path in ("process/pty/pty1/connect", "process/pty/create-connect"):
            return await self.websocket_echo(request)
        if path == "process/pty/busy/connect":
            return web.json_response({"message": "pty session exists"}, status=409)
        if path == "files/upload-v2" and request.query.get("path") == "10mib.bin":
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            return web.json_response(
                {
                    "sha256": digest.hexdigest(),
                    "size": size,
                    "chunked": request.headers.get("Transfer-Encoding"),
                }
            )
        if path == "files/download" and request.query.get("path") == "10mib.bin":
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = len(self.download)
            await response.prepare(request)
            for offset in range(0, len(self.download), 256 * 1024):
                await response.write(self.download[offset : offset + 256 * 1024])
            await response.write_eof()
            return response
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.rel_url.raw_path,
                "raw_query": request.rel_url.raw_query_string,
                "content_type": request.headers.get("Content-Type"),
                "body": (await request.read()).decode(),
            }
        )

    async def websocket_echo(self, request: web.Request) -> web.WebSocketResponse:
        self.websocket_handshakes.append(
            (request.headers.get("Sec-WebSocket-Protocol", ""), request.headers.get("Authorization", ""))
        )
        ws = web.WebSocketResponse(protocols=("X-Daytona-Pty-Exit-Control",))
        await ws.prepare(request)
        await ws.send_str('{"type":"control","status":"connected"}')
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                if message.data == "exit":
                    await ws.close(code=1011, message=b'{"exitCode":3}')
                    break
                await ws.send_str(f"echo:{message.data}")
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + message.data)
        return ws


@pytest.fixture(scope="session")
async def fake_runner() -> AsyncIterator[tuple[FakeRunner, str]]:
    runner = FakeRunner()
    server = TestServer(runner.app(), host="127.0.0.1")
    await server.start_server()
    yield runner, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture(scope="session")
async def proxy_url(nats_url: str) -> AsyncIterator[str]:
    settings = Settings(nats_url=nats_url, runner_token=RUNNER_TOKEN, signing_seal_key=SIGNING_SEAL_KEY)
    server = TestServer(create_proxy_app(settings), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
