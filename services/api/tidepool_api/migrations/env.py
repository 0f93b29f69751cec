"""Alembic environment: runs migrations over the async engine of the configured database.

On PostgreSQL the upgrade runs under a session advisory lock (`MIGRATION_LOCK`): of several processes
migrating at once (API replicas, the Kubernetes migrate Job) one migrates and the others wait for it, then
find the schema at head and do nothing. SQLite (one machine, one API process) takes no lock.
"""

from __future__ import annotations

import asyncio

import structlog
from alembic import context
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlmodel import SQLModel

from tidepool_api import db  # noqa: F401  (registers the tables on SQLModel.metadata)
from tidepool_api.migrate import MIGRATION_LOCK

target_metadata = SQLModel.metadata
log = structlog.get_logger("tidepool.migrate")


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def run_with_connection(connection: Connection) -> None:
    before = current_revision(connection)
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    log.info("migrate.done", before=before, after=current_revision(connection))


async def take_lock(connection: AsyncConnection) -> None:
    """Wait for the migration lock (held by this connection's session until released or closed)."""
    got = (
        await connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
    ).scalar()
    if not got:
        log.info("migrate.waiting", reason="another process is migrating")
        await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
    await connection.commit()


async def run_async_migrations() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"))
    async with engine.connect() as connection:
        locking = connection.dialect.name == "postgresql"
        if locking:
            await take_lock(connection)
        try:
            await connection.run_sync(run_with_connection)
            await connection.commit()
        finally:
            if locking:
                await connection.rollback()
                await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                await connection.commit()
    await engine.dispose()


asyncio.run(run_async_migrations())
