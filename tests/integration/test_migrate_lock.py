"""Issue #17: two migrators against one PostgreSQL database at once (API replicas, the migrate Job): one
migrates, the other waits for it on the advisory lock and then finds the schema at head.

Real processes (`python -m tidepool_api migrate`, the Job's command) on a fresh database of the machine's
PostgreSQL (127.0.0.1:5432, user postgres). The test holds the lock first, so both are seen waiting before
either can start: without the lock they would run the same CREATE TABLEs at once and one would fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from alembic.script import ScriptDirectory

from tests.polling import wait_until_async
from tidepool_api.migrate import MIGRATION_LOCK, alembic_config
from tidepool_runtime.process import die_with_parent

SERVER = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """The name of a fresh, empty database, dropped afterwards."""
    name = f"tidepool_migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def events(stderr: Path) -> list[dict[str, object]]:
    lines = [line for line in stderr.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


async def test_two_migrators_one_migrates_the_other_waits(database: str, tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    holder = await asyncpg.connect(f"{SERVER}/{database}")
    await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    env = {
        **os.environ,
        "TIDEPOOL_DATABASE_URL": url,
        "TIDEPOOL_DATA_DIR": str(tmp_path),
        "TIDEPOOL_LOG_JSON": "true",
    }
    logs = [tmp_path / f"migrate-{index}.log" for index in (1, 2)]
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidepool_api",
            "migrate",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            preexec_fn=die_with_parent,
        )
        for log in logs
    ]
    try:

        async def waiting() -> int:
            return int(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = $1",
                    database,
                )
            )

        async def both_waiting() -> bool:
            return await waiting() == 2

        await wait_until_async(both_waiting, "both migrators never queued on the lock", timeout=60)
        # Nothing was migrated while the lock was held.
        assert await holder.fetchval("SELECT to_regclass('alembic_version')") is None
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        codes = [await asyncio.wait_for(process.wait(), timeout=120) for process in processes]
        assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
        done = [[e for e in events(log) if e.get("event") == "migrate.done"] for log in logs]
        assert all(len(items) == 1 for items in done), done
        outcomes = sorted(((d[0]["before"] or ""), d[0]["after"]) for d in done)
        # One migrated from nothing to head; the other waited, then found head and ran nothing.
        assert outcomes == sorted([("", head), (head, head)]), outcomes
        assert all(any(e.get("event") == "migrate.waiting" for e in events(log)) for log in logs)
        assert await holder.fetchval("SELECT version_num FROM alembic_version") == head
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await holder.close()
