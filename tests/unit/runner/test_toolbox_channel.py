"""Issue #7 item 1: the runner↔daemon channel cannot be redirected, and only toolbox routes are relayed.

The attacker is the sandbox itself (its root is reachable through `sudo`), which can write into its socket
folder: it swaps the toolbox socket for a link to the host's container engine (a root-owned socket here),
a hard link, or a socket served by someone else, then calls the toolbox through the runner.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.unit.runner.sockets import SANDBOX_ROOT_UID, serve_as
from tidepool_runner.daemon_connections import DaemonConnections
from tidepool_runner.toolbox_server import build_toolbox_app

RUNNER_TOKEN = "runner-secret"
AUTH = {"Authorization": f"Bearer {RUNNER_TOKEN}"}
SANDBOX_ID = "sbx-attacker"


@dataclass
class Recorder:
    """A server that answers everything with its own name and remembers the paths it was asked."""

    name: str
    paths: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(f"{request.method} {request.rel_url.raw_path}")
        return web.json_response({"served_by": self.name, "containers": ["every", "tenant"]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app


@dataclass
class Channel:
    url: str
    socket_dir: Path
    engine_socket: Path
    daemon: Recorder
    engine: Recorder
    daemons: DaemonConnections

    def toolbox(self, path: str) -> URL:
        return URL(f"{self.url}/sandboxes/{SANDBOX_ID}/toolbox{path}", encoded=True)


@pytest.fixture
async def channel(short_tmp: Path) -> AsyncIterator[Channel]:
    daemon, engine = Recorder("daemon"), Recorder("engine")
    runners: list[web.AppRunner] = []
    for recorder in (daemon, engine):
        runner = web.AppRunner(recorder.app())
        await runner.setup()
        runners.append(runner)
    socket_dir = short_tmp / "sockets" / SANDBOX_ID
    await serve_as(SANDBOX_ROOT_UID, runners[0], socket_dir)
    # The host's container engine: a socket of the host's root, next to the runner's own files.
    engine_socket = short_tmp / "engine.sock"
    await web.UnixSite(runners[1], str(engine_socket)).start()

    daemons = DaemonConnections(lambda sandbox_id: short_tmp / "sockets" / sandbox_id)
    server = TestServer(build_toolbox_app(daemons, RUNNER_TOKEN), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    yield Channel(url, socket_dir, engine_socket, daemon, engine, daemons)
    await server.close()
    await daemons.close_all()
    for runner in runners:
        await runner.cleanup()


async def status_of(url: URL, method: str = "GET") -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.request(method, url, headers=AUTH) as response:
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body


async def test_the_real_daemon_is_reached(channel: Channel) -> None:
    assert await status_of(channel.toolbox("/version")) == (
        200,
        {"served_by": "daemon", "containers": ["every", "tenant"]},
    )


@pytest.mark.parametrize("absolute", [False, True], ids=["relative-link", "absolute-link"])
async def test_a_link_to_the_engine_socket_is_never_followed(channel: Channel, absolute: bool) -> None:
    sock = channel.socket_dir / "toolbox.sock"
    assert (await status_of(channel.toolbox("/version")))[0] == 200  # a pooled connection exists now
    sock.rename(channel.socket_dir / "moved.sock")
    # <tmp>/sockets/<id>/toolbox.sock -> <tmp>/engine.sock
    target = channel.engine_socket if absolute else Path("..", "..", channel.engine_socket.name)
    sock.symlink_to(target)
    # A connection pooled before the swap still leads to the real daemon, verified when it was made.
    assert (await status_of(channel.toolbox("/version")))[1]["served_by"] == "daemon"
    # Every new connection is verified: with the pool gone, the link leads nowhere.
    await channel.daemons.close(SANDBOX_ID)
    for path in ("/version", "/containers/json"):
        status, body = await status_of(channel.toolbox(path))
        assert status in (404, 502), body
    assert (await status_of(channel.toolbox("/version")))[1]["message"] == "sandbox toolbox is not reachable"
    sock.unlink()
    assert (await status_of(channel.toolbox("/version")))[0] == 502
    assert channel.engine.paths == []


async def test_a_hard_link_to_the_engine_socket_is_refused(channel: Channel) -> None:
    sock = channel.socket_dir / "toolbox.sock"
    sock.unlink()
    os.link(channel.engine_socket, sock)  # possible only on the same mount; the peer check still holds
    assert (await status_of(channel.toolbox("/version")))[0] == 502
    assert channel.engine.paths == []


async def test_a_socket_served_by_another_uid_is_refused(channel: Channel, short_tmp: Path) -> None:
    # The sandbox user (or another sandbox's root) serving the toolbox path: not the folder owner's uid.
    impostor = Recorder("impostor")
    runner = web.AppRunner(impostor.app())
    await runner.setup()
    (channel.socket_dir / "toolbox.sock").unlink()
    await serve_as(SANDBOX_ROOT_UID + 1000, runner, channel.socket_dir)
    os.chown(channel.socket_dir, SANDBOX_ROOT_UID, SANDBOX_ROOT_UID)  # serve_as took the folder too
    try:
        assert (await status_of(channel.toolbox("/version")))[0] == 502
        assert impostor.paths == []
    finally:
        await runner.cleanup()


async def test_a_folder_of_the_hosts_root_is_refused(channel: Channel) -> None:
    os.chown(channel.socket_dir, 0, 0)
    assert (await status_of(channel.toolbox("/version")))[0] == 502
    assert channel.daemon.paths == []


async def test_a_folder_replaced_by_a_link_is_refused(channel: Channel, short_tmp: Path) -> None:
    elsewhere = short_tmp / "elsewhere"
    channel.socket_dir.rename(elsewhere)
    channel.socket_dir.symlink_to(elsewhere)
    assert (await status_of(channel.toolbox("/version")))[0] == 502
    assert channel.daemon.paths == []


async def test_a_regular_file_is_refused(channel: Channel) -> None:
    sock = channel.socket_dir / "toolbox.sock"
    sock.unlink()
    sock.write_text("GET / HTTP/1.1\r\n")
    assert (await status_of(channel.toolbox("/version")))[0] == 502


@pytest.mark.parametrize(
    "path",
    [
        "/containers/json",
        "/v4.0.0/libpod/info",
        "/files/../containers/json",
        "/files/%2e%2e/%2E%2E/containers/json",
        "/process/session/../../../containers/json",
        "/process/session/%2e%2e/exec",
        "/version/..",
        "//version",
        "/./version",
        "/",
    ],
)
async def test_only_toolbox_routes_are_relayed(channel: Channel, path: str) -> None:
    status, body = await status_of(channel.toolbox(path))
    assert status == 404, body
    assert "no route" in str(body["message"])
    assert channel.daemon.paths == [] and channel.engine.paths == []


async def test_a_known_path_with_another_method_is_405(channel: Channel) -> None:
    for method in ("PUT", "HEAD", "DELETE"):
        status, _ = await status_of(channel.toolbox("/version"), method)
        assert status == 405
    assert channel.daemon.paths == []
