"""Issue #17: the probes Kubernetes is given. `/healthz` (liveness) answers 200 while the process runs, even
with its dependencies down; `/readyz` answers 200 only while they answer: NATS with JetStream (every
service), PostgreSQL (the API), the container engine's socket (builder, runner).

Real parts: a nats-server that the test stops and starts again on the same port and store; the machine's
PostgreSQL (a fresh database) reached through a TCP relay the test closes, as a database host that went
away; a Podman API service on a socket of its own. The API, scheduler, telemetry, proxy, builder and SSH
gateway run as real processes (`python -m tidepool_<service>`); the runner's probes (`runner_health`, the
checks its process serves) run in-process over a real bus and engine, since a whole runner process takes
over the host's sandbox network and firewall.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import asyncpg
import httpx
import pytest

from tests.conftest import free_port, nats_binary, wait_for_port
from tests.polling import wait_until, wait_until_async
from tidepool_runner.engine import ContainerEngine
from tidepool_runner.main import runner_health
from tidepool_runtime.broker import connect
from tidepool_runtime.process import die_with_parent

PODMAN_CONF = Path(__file__).resolve().parents[2] / "deploy/podman/containers.conf"


class NatsServer:
    """A JetStream nats-server the test can stop and start again (same port, same store)."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [nats_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class TcpRelay:
    """127.0.0.1:<port> relayed to a target; `close()` drops every connection and stops listening, as a
    database host that went away; `open()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in self.writers:
            writer.close()
        self.writers.clear()


def podman_service(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A Podman API service on a socket of its own (the engine a builder or runner is given)."""
    socket_path = folder / "podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)}
    process = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    wait_until(socket_path.exists, "the Podman service never made its socket", timeout=30)
    return process, f"unix://{socket_path}"


def start_service(name: str, env: dict[str, str], folder: Path) -> subprocess.Popen[bytes]:
    """`python -m tidepool_<name>`, its log in folder/<name>.log."""
    return subprocess.Popen(
        [sys.executable, "-m", f"tidepool_{name}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(folder / f"{name}.log").open("w"),
        preexec_fn=die_with_parent,
    )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database's name, dropped afterwards."""
    name = f"tidepool_probes_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def status(client: httpx.AsyncClient, url: str) -> int:
    try:
        return (await client.get(url)).status_code
    except httpx.HTTPError:
        return 0


async def all_answer(client: httpx.AsyncClient, urls: dict[str, str], expected: int) -> bool:
    return all([await status(client, url) == expected for url in urls.values()])


async def test_probes_follow_nats_database_and_engine(
    nats_server: NatsServer, database: str, tmp_path: Path
) -> None:
    relay = TcpRelay(5432)
    await relay.open()
    engine, engine_url = podman_service(tmp_path)
    others = ("scheduler", "telemetry", "proxy", "builder", "ssh_gateway")
    ports = {name: free_port() for name in ("api", *others)}
    base = {
        **os.environ,
        "TIDEPOOL_NATS_URL": nats_server.url,
        "TIDEPOOL_DATA_DIR": str(tmp_path / "data"),
        "TIDEPOOL_HEALTH_HOST": "127.0.0.1",
        "TIDEPOOL_DOCKER_HOST": engine_url,
        "TIDEPOOL_PROXY_PORT": str(free_port()),
        "TIDEPOOL_SSH_GATEWAY_PORT": str(free_port()),
    }
    specific = {
        "api": {
            "TIDEPOOL_API_PORT": str(ports["api"]),
            "TIDEPOOL_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/{database}",
        },
        **{name: {"TIDEPOOL_HEALTH_PORT": str(ports[name])} for name in others},
    }
    (tmp_path / "data").mkdir()
    started = time.monotonic()
    processes = {name: start_service(name, {**base, **env}, tmp_path) for name, env in specific.items()}
    ready = {name: f"http://127.0.0.1:{port}/readyz" for name, port in ports.items()}
    live = {name: f"http://127.0.0.1:{port}/healthz" for name, port in ports.items()}

    def logs() -> str:
        return "\n".join(f"{n}: {(tmp_path / f'{n}.log').read_text()[-1500:]}" for n in processes)

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for name, url in ready.items():
                await wait_until_async(lambda u=url: _is(status(client, u), 200), logs, timeout=120)
                print(f"{name} ready after {time.monotonic() - started:.1f} s")
            assert await all_answer(client, live, 200)

            # NATS down: nobody is ready, everybody is alive (a bus outage must not restart every pod).
            nats_server.stop()
            await wait_until_async(lambda: all_answer(client, ready, 503), "still ready without NATS")
            print(f"nats down seen after {time.monotonic() - started:.1f} s")
            assert await all_answer(client, live, 200)
            body = (await client.get(ready["scheduler"])).json()
            assert body["status"] == "fail" and body["checks"]["nats"] != "ok", body
            nats_server.start()
            await wait_until_async(lambda: all_answer(client, ready, 200), "not ready after NATS came back")
            print(f"nats back seen after {time.monotonic() - started:.1f} s")

            # The database gone: the API is not ready (the others do not use it).
            await relay.close()
            await wait_until_async(lambda: _is(status(client, ready["api"]), 503), "API ready without its DB")
            body = (await client.get(ready["api"])).json()
            assert body["checks"]["database"] != "ok" and body["checks"]["nats"] == "ok", body
            assert await status(client, live["api"]) == 200
            others_ready = {name: url for name, url in ready.items() if name != "api"}
            await wait_until_async(lambda: all_answer(client, others_ready, 200), "the DB outage spread")
            print(f"database down seen after {time.monotonic() - started:.1f} s")
            await relay.open()
            await wait_until_async(lambda: _is(status(client, ready["api"]), 200), "API not ready after DB")
            print(f"database back seen after {time.monotonic() - started:.1f} s")

            # The engine gone: the builder is not ready.
            engine.kill()
            engine.wait(timeout=30)
            await wait_until_async(
                lambda: _is(status(client, ready["builder"]), 503), "builder ready, no engine"
            )
            body = (await client.get(ready["builder"])).json()
            assert body["checks"]["engine"] != "ok" and body["checks"]["nats"] == "ok", body
        for name, process in processes.items():
            assert process.poll() is None, f"{name} exited: {logs()}"
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if engine.poll() is None:
            engine.kill()
            engine.wait(timeout=30)
        await relay.close()


async def test_runner_probes_follow_nats_and_engine(nats_server: NatsServer, tmp_path: Path) -> None:
    engine_process, engine_url = podman_service(tmp_path)
    bus = await connect(nats_server.url, "probe-runner")
    engine = ContainerEngine(aiodocker.Docker(url=engine_url))
    health = runner_health(lambda: bus, lambda: engine)
    try:
        await wait_until_async(lambda: _ready_ok(health), "runner never ready", timeout=60)
        assert await health.ready() == (200, {"status": "ok", "checks": {"nats": "ok", "engine": "ok"}})
        nats_server.stop()
        code, body = await wait_until_async(
            lambda: _ready_fails(health), "runner ready without NATS", timeout=30
        )
        assert body["checks"]["nats"] != "ok" and body["checks"]["engine"] == "ok", body
        assert health.live()[0] == 200
        nats_server.start()
        await wait_until_async(lambda: _ready_ok(health), "runner not ready after NATS came back")
        engine_process.kill()
        engine_process.wait(timeout=30)
        code, body = await wait_until_async(lambda: _ready_fails(health), "runner ready without its engine")
        assert code == 503 and body["checks"]["engine"] != "ok" and body["checks"]["nats"] == "ok", body
    finally:
        await engine.close()
        await bus.close()
        if engine_process.poll() is None:
            engine_process.kill()
            engine_process.wait(timeout=30)


async def _is(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def _ready_fails(health: object) -> tuple[int, dict[str, object]] | None:
    code, body = await health.ready()  # type: ignore[attr-defined]
    return (code, body) if code == 503 else None


async def _ready_ok(health: object) -> bool:
    return (await health.ready())[0] == 200  # type: ignore[attr-defined]
