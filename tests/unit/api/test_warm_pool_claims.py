"""Warm pools against a real database (SQLite; PostgreSQL in the integration test): concurrent claims never
share a member, a claim re-owns the row with the request's values, pool sizing; only the claimer's own and
the operator's pools are claimed; an organization's unclaimed members hold its quota (pool create, PATCH,
each refill); the installation's cap; the failure backoff; members run the snapshot's entrypoint."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlmodel import col, select

from tidepool_api import quotas, sandboxes, warm_pools
from tidepool_api.db import WARM_POOL_ORGANIZATION_ID, Database, Organization, Sandbox, Snapshot, WarmPool
from tidepool_api.errors import ApiError
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


async def no_announce(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The refill's intents, recorded instead of published (no bus here)."""
    announced: list[tuple[str, str]] = []

    async def announce(
        _context: Any, sandbox: Sandbox, action: Any, _desired: Any, force: bool = False
    ) -> None:
        announced.append((sandbox.id, str(action)))

    monkeypatch.setattr(sandboxes, "announce", announce)
    return announced


async def set_pool(database: Database, pool_id: str, size: int) -> None:
    async with database.sessions() as session:
        row = await session.get(WarmPool, pool_id)
        assert row is not None
        row.pool = size
        session.add(row)
        await session.commit()


async def pool_state(database: Database, pool_id: str) -> tuple[int, str | None]:
    """(members not being removed, the pool's errorReason)."""
    async with database.sessions() as session:
        row = await session.get(WarmPool, pool_id)
        assert row is not None
        members = (
            await session.exec(
                select(Sandbox).where(
                    Sandbox.warm_pool_id == pool_id, col(Sandbox.state).not_in(warm_pools.GONE)
                )
            )
        ).all()
        return len(members), row.error_reason


async def test_another_organizations_pool_is_never_claimed_the_operators_is(tmp_path: Path) -> None:
    database, context, snapshot, pool = await populated(tmp_path)
    async with database.sessions() as session:
        session.add(Organization(id="org-b", name="b"))
        await session.commit()
    async with database.sessions() as session:
        assert await warm_pools.claim(context, session, "org-b", CreateSandboxRequest(), snapshot, {}) is None
    assert (await pool_state(database, pool.id))[0] == MEMBERS
    # Made by the operator (the admin organization): every organization's creates may claim from it.
    async with database.sessions() as session:
        session.add(Organization(id="admin", name="admin", is_admin=True))
        row = await session.get(WarmPool, pool.id)
        assert row is not None
        row.organization_id = "admin"
        await session.commit()
    async with database.sessions() as session:
        claimed = await warm_pools.claim(
            context, session, "org-b", CreateSandboxRequest(), snapshot, {"name": "mine"}
        )
        await session.commit()
        assert claimed is not None and claimed.organization_id == "org-b"
    await database.close()


async def test_unclaimed_members_hold_their_owners_quota(tmp_path: Path) -> None:
    database, context, _snapshot, pool = await populated(tmp_path)
    async with database.sessions() as session:
        assert await quotas.usage(session, "org-a") == quotas.Resources(MEMBERS, MEMBERS, 3 * MEMBERS)
        row = await session.get(Organization, "org-a")
        assert row is not None
        row.total_cpu_quota = MEMBERS + 1
        session.add(row)
        await session.commit()
    # Growing the pool past the quota is refused as a create over it would be; up to it, and shrinking, pass.
    with pytest.raises(ApiError) as refused:
        await warm_pools.update_pool(context, "org-a", pool.id, MEMBERS + 2)
    assert refused.value.status_code == 403
    assert refused.value.message.startswith(f"Total CPU limit exceeded. Maximum allowed: {MEMBERS + 1}.")
    assert (await warm_pools.update_pool(context, "org-a", pool.id, MEMBERS + 1))[0].pool == MEMBERS + 1
    assert (await warm_pools.update_pool(context, "org-a", pool.id, 1))[0].pool == 1
    # A new pool's members must fit besides what the organization already holds (its first pool's 4).
    other = Snapshot(
        id=str(uuid.uuid4()),
        name="other",
        image_name="localhost/other:1",
        state="active",
        cpu=1,
        memory=1,
        disk=1,
    )
    other.organization_id = "org-a"
    async with database.sessions() as session:
        session.add(other)
        await session.commit()
    with pytest.raises(ApiError) as refused:
        await warm_pools.create_pool(context, "org-a", "other", 2, None)
    assert refused.value.status_code == 403 and refused.value.message.startswith("Total CPU limit exceeded")
    made, _ = await warm_pools.create_pool(context, "org-a", "other", 1, None)
    assert made.pool == 1
    await database.close()


async def test_a_refill_admits_each_member_against_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, context, _snapshot, pool = await populated(tmp_path)
    announced = await no_announce(monkeypatch)
    async with database.sessions() as session:
        row = await session.get(Organization, "org-a")
        assert row is not None
        row.total_cpu_quota = MEMBERS + 1
        session.add(row)
        await session.commit()
    # Raised behind the API's back (a quota lowered after the pool was made has the same effect).
    await set_pool(database, pool.id, MEMBERS + 3)
    await warm_pools.refill_once(context)
    count, reason = await pool_state(database, pool.id)
    assert count == MEMBERS + 1, "the refill took the organization over its quota"
    assert reason is not None and reason.startswith(
        f"Total CPU limit exceeded. Maximum allowed: {MEMBERS + 1}."
    )
    assert len(announced) == 1
    # The organization's own create is now refused: the pool holds its quota.
    with pytest.raises(ApiError) as refused:
        await cold_create(database, context)
    assert refused.value.status_code == 403
    # Back within the quota: the reason goes.
    await set_pool(database, pool.id, MEMBERS + 1)
    await warm_pools.refill_once(context)
    assert await pool_state(database, pool.id) == (MEMBERS + 1, None)
    await database.close()


async def cold_create(database: Database, context: Any) -> None:
    """What `POST /sandbox` does for a cold create of org-a: admit under the quota lock, insert, commit."""
    async with database.sessions() as session, quotas.organization_lock(session, "org-a") as locked:
        sandbox = Sandbox(
            id=str(uuid.uuid4()),
            organization_id="org-a",
            name=str(uuid.uuid4()),
            state="creating",
            desired_state="started",
            image="localhost/tidepool/default:test",
            cpu=1,
            memory=1,
            disk=1,
        )
        await sandboxes.admit_new(context, session, locked, sandbox)
        session.add(sandbox)
        await session.commit()


async def test_a_burst_of_creates_and_a_refill_never_overshoot_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, context, _snapshot, pool = await populated(tmp_path)
    await no_announce(monkeypatch)
    async with database.sessions() as session:
        row = await session.get(Organization, "org-a")
        assert row is not None
        row.total_cpu_quota = MEMBERS + 2
        session.add(row)
        await session.commit()
    await set_pool(database, pool.id, MEMBERS + 4)
    outcomes = await asyncio.gather(
        warm_pools.refill_once(context),
        *(cold_create(database, context) for _ in range(4)),
        return_exceptions=True,
    )
    assert all(outcome is None or isinstance(outcome, ApiError) for outcome in outcomes), outcomes
    async with database.sessions() as session:
        assert (await quotas.usage(session, "org-a")).cpu == MEMBERS + 2
    await database.close()


async def test_the_installations_cap_on_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database, context, _snapshot, pool = await populated(tmp_path)
    await no_announce(monkeypatch)
    context.settings = Settings(data_dir=tmp_path, database_url="", warm_pool_max_members=MEMBERS + 1)
    await set_pool(database, pool.id, MEMBERS + 3)
    await warm_pools.refill_once(context)
    count, reason = await pool_state(database, pool.id)
    assert count == MEMBERS + 1
    assert reason is not None and "TIDEPOOL_WARM_POOL_MAX_MEMBERS" in reason
    await database.close()


async def test_a_pool_whose_members_fail_backs_off_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, context, _snapshot, pool = await populated(tmp_path)
    announced = await no_announce(monkeypatch)
    context.settings = Settings(data_dir=tmp_path, database_url="", warm_pool_tick_seconds=100)
    async with database.sessions() as session:
        for member in (await session.exec(select(Sandbox).where(Sandbox.warm_pool_id == pool.id))).all():
            member.state, member.error_reason = "error", "image pull failed: no such host"
            session.add(member)
        await session.commit()
    await warm_pools.refill_once(context)
    # The failed ones are removed; none is made while the pool waits (100 s: one tick).
    assert sorted(action for _, action in announced) == ["destroy"] * MEMBERS
    count, reason = await pool_state(database, pool.id)
    assert count == 0
    assert reason is not None and "image pull failed: no such host" in reason and "100s" in reason
    await warm_pools.refill_once(context)
    assert len(announced) == MEMBERS and (await pool_state(database, pool.id))[0] == 0
    await database.close()


def test_the_backoff_doubles_up_to_its_ceiling_and_a_started_member_ends_it() -> None:
    backoff = warm_pools.Backoff()
    failed = [Sandbox(id="m", organization_id="o", name="m", error_reason="boom")]
    assert "Next try in 2s" in backoff.failed("p", failed, 2, 5)
    assert "Next try in 4s" in backoff.failed("p", failed, 2, 5)
    assert "Next try in 5s" in backoff.failed("p", failed, 2, 5)
    assert backoff.waiting("p") and "boom" in (backoff.reason("p") or "")
    backoff.made("p", "probe")
    old = Sandbox(id="old", organization_id="o", name="old", state="started")
    backoff.settle("p", [old])
    assert backoff.reason("p") is not None, "a member older than the failures proves nothing"
    backoff.settle("p", [old, Sandbox(id="probe", organization_id="o", name="probe", state="started")])
    assert backoff.reason("p") is None and not backoff.waiting("p")


async def test_members_run_the_snapshots_entrypoint_and_a_claim_with_env_is_cold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, context, snapshot, pool = await populated(tmp_path)
    await no_announce(monkeypatch)
    server = ["python3", "-m", "http.server", "8080"]
    async with database.sessions() as session:
        row = await session.get(Snapshot, snapshot.id)
        assert row is not None
        row.entrypoint = server
        session.add(row)
        await session.commit()
        await session.refresh(row)
        snapshot = row
    # The members made before run no entrypoint: outdated, replaced by ones that run it.
    await warm_pools.refill_once(context)
    async with database.sessions() as session:
        members = (await session.exec(select(Sandbox).where(Sandbox.warm_pool_id == pool.id))).all()
        fresh = [m for m in members if m.state == "creating"]
        assert len(fresh) == MEMBERS and all(m.entrypoint == server for m in fresh)
        assert all(m.state == "destroying" for m in members if m.entrypoint is None)
        # Not claimable: none has started yet, and the old ones are going.
        assert await warm_pools.claim(context, session, "org-a", CreateSandboxRequest(), snapshot, {}) is None
        for member in fresh:
            member.state = "started"
            session.add(member)
        await session.commit()
    async with database.sessions() as session:
        with_env = CreateSandboxRequest(env={"PORT": "9000"})
        assert await warm_pools.claim(context, session, "org-a", with_env, snapshot, {}) is None
        claimed = await warm_pools.claim(
            context, session, "org-a", CreateSandboxRequest(), snapshot, {"name": "web"}
        )
        await session.commit()
        assert claimed is not None and claimed.entrypoint == server
        assert sandboxes.spec_of(claimed).entrypoint == server
    await database.close()
