"""Fixtures for the runner's unit tests: short temp dirs (unix socket paths are limited to 107 bytes) and a
private JetStream nats-server."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tidepool_runner import subscribers as runner_subscribers
from tidepool_runtime.broker import Bus, connect


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    connected = await connect(nats_url, name="runner-unit-tests", publishes=runner_subscribers.PUBLISHES)
    yield connected
    await connected.close()
