"""Integration fixtures: one real Tidepool stack (NATS, Podman, services) for the whole session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import httpx
import pytest
from daytona import Daytona, DaytonaConfig

from tests.integration.spans import SpanCollector
from tests.integration.stackthread import StackThread, drop_postgres_database, fresh_postgres_database


@pytest.fixture(scope="session")
def spans() -> Iterator[SpanCollector]:
    """Every span the stack's services export (they get TIDEPOOL_OTLP_ENDPOINT pointing here)."""
    collector = SpanCollector()
    collector.start()
    saved = os.environ.get("TIDEPOOL_OTLP_ENDPOINT")
    os.environ["TIDEPOOL_OTLP_ENDPOINT"] = collector.url
    try:
        yield collector
    finally:
        if saved is None:
            os.environ.pop("TIDEPOOL_OTLP_ENDPOINT", None)
        else:
            os.environ["TIDEPOOL_OTLP_ENDPOINT"] = saved
        collector.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, spans: SpanCollector) -> Iterator[StackThread]:
    base_url = os.environ.get("TIDEPOOL_DATABASE_URL", "")
    database_url, database_name = fresh_postgres_database(base_url) if base_url else ("", "")
    running = StackThread(tmp_path_factory.mktemp("tidepool"), database_url=database_url)
    try:
        running.start()
    except BaseException:
        print(running.log_path.read_text()[-20000:])
        running.stop()
        raise
    try:
        yield running
    finally:
        running.stop()
        if database_name:
            drop_postgres_database(base_url, database_name)


@pytest.fixture(scope="session")
def sdk_env(stack: StackThread) -> Iterator[None]:
    """The official SDK reads DAYTONA_API_URL / DAYTONA_API_KEY, exactly as a user's code does."""
    saved = {name: os.environ.get(name) for name in ("DAYTONA_API_URL", "DAYTONA_API_KEY")}
    os.environ["DAYTONA_API_URL"] = stack.api_url
    os.environ["DAYTONA_API_KEY"] = stack.api_key
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def tenant_key(stack: StackThread) -> str:
    """Another organization's own key (the attacker's, in isolation tests), made by the admin."""
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"tenant-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["apiKey"]["value"])


@pytest.fixture(scope="module")
def tenant(stack: StackThread, tenant_key: str) -> Daytona:
    """The SDK as that other organization."""
    return Daytona(DaytonaConfig(api_key=tenant_key, api_url=stack.api_url))
