"""Migration 0012: keys made before scopes existed keep the full access they had (every permission).

On SQLite, or on PostgreSQL (a fresh database) when TIDEPOOL_DATABASE_URL names a server.
"""

from __future__ import annotations

import asyncio
import json

from alembic import command

from tests.unit.api.test_organization_admin_migration import database_url, run_sql
from tidepool_api.migrate import alembic_config
from tidepool_contracts.permissions import ALL_PERMISSIONS

__all__ = ["database_url"]  # the fixture, shared


def test_existing_keys_keep_full_access(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0009")
    asyncio.run(
        run_sql(
            database_url,
            "INSERT INTO organization (id, name, max_cpu_per_sandbox, max_memory_per_sandbox, "
            "max_disk_per_sandbox, is_admin, created_at) "
            "VALUES ('o', 'o', 4, 8, 10, false, CURRENT_TIMESTAMP)",
        )
    )
    asyncio.run(
        run_sql(
            database_url,
            "INSERT INTO api_key (id, organization_id, name, key_hash, key_prefix, revoked, created_at) "
            "VALUES ('k', 'o', 'default', 'h', 'tp_abcde', false, CURRENT_TIMESTAMP)",
        )
    )
    command.upgrade(config, "head")
    [(stored,)] = asyncio.run(run_sql(database_url, "SELECT permissions FROM api_key"))
    permissions = json.loads(stored) if isinstance(stored, str) else stored
    assert permissions == list(ALL_PERMISSIONS)
    command.downgrade(config, "0009")
    command.upgrade(config, "head")
