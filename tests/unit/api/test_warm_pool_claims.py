"""Warm-pool claims against a real database (SQLite; PostgreSQL in the integration test): concurrent claims
never share a member, a claim re-owns the row with the request's values, and pool sizing."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlmodel import col, select

from tidepool_api import sandboxes, warm_pools
from tidepool_api.db import WARM_POOL_ORGANIZATION_ID, Database, Organization, Sandbox, Snapshot, WarmPool
from tidepool_api.migrate import migrate
from tidepool_api.schemas import CreateSandboxRequest
from tidepool_runtime.settings import Settings

MEMBERS = 4
CLAIMERS = 10


async def populated(tmp_path: Path) -> tuple[Database, Any, Snapshot, WarmPool]:
    settings = Settings(data_dir=tmp_path, database_url="")
    await migrate(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    snapshot = Snapshot(
        id=str(uuid.uuid4()),
        name="daytona-small",
        image_name="localhost/tidepool/default:test",
        state="active",
        general=True,
        cpu=1,
        memory=1,
        disk=3,
    )
    async with database.sessions() as session:
        session.add(Organization(id=WARM_POOL_ORGANIZATION_ID, name="pool"))
        session.add(Organization(id="org-a", name="a"))
        session.add(snapshot)
        await session.flush()
        pool = warm_pools._pool_row("org-a", snapshot, settings.runner_region, MEMBERS, configured=False)
        session.add(pool)
        await session.flush()
        for _ in range(MEMBERS):
            member = warm_pools._member(SimpleNamespace(settings=settings), pool)  # type: ignore[arg-type]
            member.state = "started"
            session.add(member)
        await session.commit()
    return database, SimpleNamespace(settings=settings, database=database), snapshot, pool


async def test_concurrent_claims_get_distinct_members_and_the_rest_get_none(tmp_path: Path) -> None:
    database, context, snapshot, pool = await populated(tmp_path)

    async def claim(index: int) -> str | None:
        async with database.sessions() as session:
            request = CreateSandboxRequest(env={"N": str(index)}, labels={"i": str(index)})
            claimed = await warm_pools.claim(
                context,
                session,
                "org-a",
                request,
                snapshot,
                {"name": f"s{index}", "labels": {"i": str(index)}, "env": {"N": str(index)}},
            )
            await session.commit()
            return claimed.id if claimed is not None else None

    results = await asyncio.gather(*(claim(index) for index in range(CLAIMERS)))
    won = [sandbox_id for sandbox_id in results if sandbox_id is not None]
    assert len(won) == MEMBERS
    assert len(set(won)) == MEMBERS, "two claims got the same sandbox"
    async with database.sessions() as session:
        rows = (await session.exec(select(Sandbox).where(col(Sandbox.id).in_(won)))).all()
        for row in rows:
            index = row.name.removeprefix("s")
            assert (row.organization_id, row.warm_pool_id, row.claimed) == ("org-a", None, True)
            assert (row.env, row.labels, row.daemon_version) == ({"N": index}, {"i": index}, None)
        left = (
            await session.exec(select(Sandbox).where(Sandbox.organization_id == WARM_POOL_ORGANIZATION_ID))
        ).all()
        assert left == []
    assert pool.id
    await database.close()


async def test_a_request_the_pool_cannot_serve_claims_nothing(tmp_path: Path) -> None:
    database, context, snapshot, _pool = await populated(tmp_path)
    for request in (
        CreateSandboxRequest(cpu=2),
        CreateSandboxRequest(user="root"),
        CreateSandboxRequest(network_block_all=True),
    ):
        async with database.sessions() as session:
            assert await warm_pools.claim(context, session, "org-a", request, snapshot, {}) is None
    async with database.sessions() as session:
        unclaimed = (
            await session.exec(select(Sandbox).where(Sandbox.organization_id == WARM_POOL_ORGANIZATION_ID))
        ).all()
        assert len(unclaimed) == MEMBERS
    await database.close()


def test_target_size_follows_demand_between_floor_and_ceiling() -> None:
    assert warm_pools.target_size(0, 1, 8) == 1
    assert warm_pools.target_size(5, 1, 8) == 5
    assert warm_pools.target_size(50, 1, 8) == 8
    assert warm_pools.target_size(0, 3, 3) == 3
    assert warm_pools.target_size(9, 0, 0) == 0


async def test_refill_makes_the_configured_pool_and_its_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, context, snapshot, own_pool = await populated(tmp_path)
    async with database.sessions() as session:
        session.add(Organization(id="admin", name="admin", is_admin=True))
        await session.commit()
    announced: list[tuple[str, str]] = []

    async def announce(
        _context: Any, sandbox: Sandbox, action: Any, _desired: Any, force: bool = False
    ) -> None:
        announced.append((sandbox.id, str(action)))

    monkeypatch.setattr(sandboxes, "announce", announce)
    await warm_pools.refill_once(context)
    async with database.sessions() as session:
        configured = (await session.exec(select(WarmPool).where(col(WarmPool.configured).is_(True)))).one()
        assert (configured.organization_id, configured.snapshot_id, configured.pool) == (
            "admin",
            snapshot.id,
            1,
        )
        members = (await session.exec(select(Sandbox).where(Sandbox.warm_pool_id == configured.id))).all()
        assert [m.organization_id for m in members] == [WARM_POOL_ORGANIZATION_ID]
        assert (members[0].state, members[0].auto_stop_interval) == ("creating", 0)
    assert announced == [(members[0].id, "create")]
    # The organization's own pool was full already: nothing made for it, nothing removed.
    assert own_pool.id
    await database.close()
