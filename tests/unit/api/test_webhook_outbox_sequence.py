"""The webhook outbox's `seq` never goes back, on SQLite (the embedded default) as on PostgreSQL: the relay
deletes each row it publishes, so the outbox is usually empty, and a sequence that restarted at 1 would
let a resource's later change overtake an earlier one in delivery (`WebhookDelivery.sequence` orders them)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import delete

from tests.integration.stackthread import drop_postgres_database, fresh_postgres_database
from tidepool_api.db import Database, WebhookOutbox
from tidepool_api.migrate import migrate
from tidepool_runtime.settings import Settings

# PostgreSQL too when TIDEPOOL_DATABASE_URL names a server (CI sets it).
SERVER = os.environ.get("TIDEPOOL_DATABASE_URL", "")


@pytest.fixture(params=["sqlite", "postgresql"] if SERVER else ["sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield Settings(data_dir=tmp_path, database_url="").effective_database_url
        return
    url, name = fresh_postgres_database(SERVER)
    yield url
    drop_postgres_database(SERVER, name)


def row() -> WebhookOutbox:
    return WebhookOutbox(
        id=str(uuid.uuid4()), organization_id="org", event_type="volume.created", ordering_key="volume:v"
    )


async def test_the_sequence_keeps_growing_after_the_outbox_is_emptied(database_url: str) -> None:
    await migrate(database_url)
    database = Database(database_url)
    try:
        seen: list[int] = []
        for _ in range(2):
            async with database.sessions() as session:
                first, second = row(), row()
                session.add(first)
                session.add(second)
                await session.commit()
                seen += [first.seq or 0, second.seq or 0]
                await session.exec(delete(WebhookOutbox))  # type: ignore[call-overload]
                await session.commit()
        assert seen == sorted(seen) and len(set(seen)) == 4, seen
    finally:
        await database.close()
