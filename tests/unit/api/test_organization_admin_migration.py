"""Migration 0009: admin becomes an explicit flag; an existing installation's admin (the oldest
organization, as it was inferred until then) keeps the role, and no other organization gets it.

On SQLite, or on PostgreSQL (a fresh database) when TIDEPOOL_DATABASE_URL names a server, as the
integration stack chooses.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.integration.stackthread import drop_postgres_database, fresh_postgres_database
from tidepool_api.migrate import alembic_config


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    base_url = os.environ.get("TIDEPOOL_DATABASE_URL", "")
    if not base_url.startswith("postgresql"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'tidepool.db'}"
        return
    url, name = fresh_postgres_database(base_url)
    try:
        yield url
    finally:
        drop_postgres_database(base_url, name)


async def run_sql(url: str, statement: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        await engine.dispose()


def test_oldest_organization_becomes_the_only_admin(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0008")
    now = datetime.now(UTC)
    # Inserted newest first: the admin is the oldest by created_at, not the first row.
    for org_id, name, age in (("t2", "team-2", 1), ("t1", "team-1", 5), ("adm", "admin", 60)):
        asyncio.run(
            run_sql(
                database_url,
                "INSERT INTO organization (id, name, max_cpu_per_sandbox, max_memory_per_sandbox, "
                "max_disk_per_sandbox, created_at) VALUES (:id, :name, 4, 8, 10, :created)",
                id=org_id,
                name=name,
                created=now - timedelta(minutes=age),
            )
        )
    command.upgrade(config, "head")
    rows = asyncio.run(run_sql(database_url, "SELECT id, is_admin, deleted_at FROM organization ORDER BY id"))
    assert [(row[0], bool(row[1]), row[2]) for row in rows] == [
        ("adm", True, None),
        ("t1", False, None),
        ("t2", False, None),
    ]
    command.downgrade(config, "0008")
    command.upgrade(config, "head")
