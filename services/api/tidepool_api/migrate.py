"""Schema migrations (Alembic), applied at API start-up so a new install and an upgrade behave alike."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# pg_advisory_lock key (bigint) every Tidepool migrator takes on PostgreSQL (migrations/env.py): "tidepool".
MIGRATION_LOCK = int.from_bytes(b"tidepool", "big") >> 1


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade_to_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


async def migrate(database_url: str) -> None:
    # Alembic's env runs its own event loop, so it gets a thread of its own.
    await asyncio.to_thread(upgrade_to_head, database_url)


def main() -> None:
    """`python -m tidepool_api.migrate`: the migrate Job of deploy/k8s (TIDEPOOL_DATABASE_URL)."""
    from tidepool_runtime.settings import DatabaseSettings

    upgrade_to_head(DatabaseSettings().database_url)


if __name__ == "__main__":
    main()
