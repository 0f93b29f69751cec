"""Migration 0021: attempts logged before it lose the receiver's answer they kept; their status stays.

On SQLite, or on PostgreSQL (a fresh database) when TIDEPOOL_DATABASE_URL names a server.
"""

from __future__ import annotations

import asyncio

from alembic import command

from tests.unit.api.test_organization_admin_migration import database_url, run_sql
from tidepool_api.migrate import alembic_config

__all__ = ["database_url"]  # the fixture, shared


def test_logged_answers_are_removed(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0020")
    for attempt_id, status_code, error in (
        ("answered", 503, '\'HTTP 503: {"AccessKeyId": "internal"}\''),
        ("refused", "NULL", "'ClientConnectorError: Cannot connect'"),
        ("delivered", 204, "NULL"),
    ):
        asyncio.run(
            run_sql(
                database_url,
                "INSERT INTO webhook_attempt (id, delivery_id, endpoint_id, organization_id, message_id, "
                "event_type, attempt, status_code, error, duration_ms, attempted_at) VALUES "
                f"('{attempt_id}', 'd', 'e', 'o', 'm', 'volume.created', 1, {status_code}, {error}, 5, "
                "CURRENT_TIMESTAMP)",
            )
        )
    command.upgrade(config, "head")
    rows = asyncio.run(
        run_sql(database_url, "SELECT id, status_code, error FROM webhook_attempt ORDER BY id")
    )
    assert [tuple(row) for row in rows] == [
        ("answered", 503, "HTTP 503"),
        ("delivered", 204, None),
        ("refused", None, "ClientConnectorError: Cannot connect"),
    ]
