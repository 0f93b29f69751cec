"""Warm pools (wire contract §2.8, design digest §1.8): started sandboxes that belong to no organization
(WARM_POOL_ORGANIZATION_ID), claimed by a matching `POST /sandbox` instead of a cold start.

- Pools are `warm_pool` rows: the operator's (setting `warm_pool_snapshots`, owned by the admin organization,
  `configured`) and those an organization makes with `POST /warm-pools`.
- Size: a pool made with `POST /warm-pools` keeps exactly `pool` members (the SDK's "number of warm
  sandboxes to keep ready"; 0 drains it). A configured pool follows demand: the creates that asked for its
  snapshot within `warm_pool_demand_window_seconds`, kept between `warm_pool_min` and `warm_pool_max`.
  `refill_forever` creates missing members and removes surplus, errored and outdated ones every
  `warm_pool_tick_seconds`.
- Claim (`claim`): only for a create that a member can serve as it is — same snapshot image, resources
  unset or equal to the pool's, same user, no volumes, no build, no `networkBlockAll`. One compare-and-set
  UPDATE moves a started member to the claimer (organization, name, labels, env, public, intervals): two
  creates never get the same sandbox (the loser's UPDATE matches no row and it tries the next candidate).
  The desired record, preview access and route follow (`announce` CLAIM; the runner rewrites the route
  and gives the daemon the env, `POST /env`); the create answers once the runner has reported.

Pool members are excluded from every organization's list and count (they are not in one) and from the
idle timers (auto-stop 0). The refill loop runs in each API process: with several API replicas the pools
may briefly overshoot (the surplus is removed at the next tick).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict, deque
from datetime import UTC, datetime

import structlog
from sqlalchemy import and_, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api import previews, webhooks
from tidepool_api.context import ApiContext
from tidepool_api.db import WARM_POOL_ORGANIZATION_ID, Organization, Sandbox, Snapshot, WarmPool
from tidepool_api.errors import bad_request, conflict, not_found
from tidepool_api.live_events import record_created
from tidepool_api.schemas import CreateSandboxRequest
from tidepool_contracts.models import SandboxAction
from tidepool_contracts.states import DesiredState, SandboxState, assert_transition

log = structlog.get_logger("tidepool.api.warm_pools")

GONE = (SandboxState.DESTROYED.value, SandboxState.DESTROYING.value)
FAILED = (SandboxState.ERROR.value, SandboxState.BUILD_FAILED.value)
# Candidates read per claim attempt; shuffled so concurrent claims mostly try different rows.
CLAIM_CANDIDATES = 16
CLAIM_ROUNDS = 3


def utc_now() -> datetime:
    return datetime.now(UTC)


class Demand:
    """Recent creates per pool (monotonic timestamps), in this API process."""

    def __init__(self) -> None:
        self._asked: dict[str, deque[float]] = defaultdict(deque)

    def record(self, pool_id: str) -> None:
        self._asked[pool_id].append(time.monotonic())

    def recent(self, pool_id: str, window_seconds: float) -> int:
        asked = self._asked.get(pool_id)
        if asked is None:
            return 0
        horizon = time.monotonic() - window_seconds
        while asked and asked[0] < horizon:
            asked.popleft()
        return len(asked)


_demand = Demand()


def target_size(recent_demand: int, floor: int, ceiling: int) -> int:
    """How many members a pool should have: its recent demand between `floor` and `ceiling`."""
    return max(floor, min(max(ceiling, floor), recent_demand))


def pool_bounds(context: ApiContext, pool: WarmPool) -> tuple[int, int]:
    """(floor, ceiling): a configured pool's from the settings, an organization's own is fixed at `pool`."""
    settings = context.settings
    if pool.configured:
        return settings.warm_pool_min, settings.warm_pool_max
    return pool.pool, pool.pool


async def current_sizes(session: AsyncSession, pool_ids: list[str]) -> dict[str, int]:
    """Started, unclaimed members per pool."""
    if not pool_ids:
        return {}
    rows = await session.exec(
        select(Sandbox.warm_pool_id).where(
            col(Sandbox.warm_pool_id).in_(pool_ids),
            Sandbox.organization_id == WARM_POOL_ORGANIZATION_ID,
            Sandbox.state == SandboxState.STARTED.value,
        )
    )
    sizes: dict[str, int] = defaultdict(int)
    for pool_id in rows.all():
        if pool_id is not None:
            sizes[pool_id] += 1
    return sizes


# --- the organization's API (§2.8) ---


async def list_pools(context: ApiContext, organization_id: str) -> list[tuple[WarmPool, int]]:
    async with context.database.sessions() as session:
        pools = list(
            (
                await session.exec(
                    select(WarmPool)
                    .where(WarmPool.organization_id == organization_id)
                    .order_by(col(WarmPool.created_at))
                )
            ).all()
        )
        sizes = await current_sizes(session, [pool.id for pool in pools])
    return [(pool, sizes.get(pool.id, 0)) for pool in pools]


async def create_pool(
    context: ApiContext, organization_id: str, snapshot_name: str, size: int, target: str | None
) -> tuple[WarmPool, int]:
    """`POST /warm-pools`: 400 for a snapshot the organization cannot use or a size beyond the ceiling,
    409 if the organization has a pool for that snapshot and region already."""
    from tidepool_api.sandboxes import resolve_snapshot  # sandboxes imports this module

    ceiling = context.settings.warm_pool_max
    if size < 1 or size > ceiling:
        raise bad_request(f"pool must be between 1 and {ceiling}, got {size}")
    region = target or context.settings.runner_region
    if region != context.settings.runner_region:
        raise bad_request(f"Region {region} not found")
    async with context.database.sessions() as session:
        snapshot = await resolve_snapshot(session, organization_id, snapshot_name)
        existing = await session.exec(
            select(WarmPool.id).where(
                WarmPool.organization_id == organization_id,
                WarmPool.snapshot_id == snapshot.id,
                WarmPool.target == region,
            )
        )
        if existing.first() is not None:
            raise conflict(f"A warm pool for snapshot {snapshot.name} in {region} already exists")
        pool = _pool_row(organization_id, snapshot, region, size, configured=False)
        session.add(pool)
        await session.commit()
    return pool, 0


async def update_pool(
    context: ApiContext, organization_id: str, pool_id: str, size: int
) -> tuple[WarmPool, int]:
    ceiling = context.settings.warm_pool_max
    if size < 0 or size > ceiling:
        raise bad_request(f"pool must be between 0 and {ceiling}, got {size}")
    async with context.database.sessions() as session:
        pool = await _own_pool(session, organization_id, pool_id)
        pool.pool = size
        pool.updated_at = utc_now()
        session.add(pool)
        await session.commit()
        sizes = await current_sizes(session, [pool.id])
    return pool, sizes.get(pool.id, 0)


async def delete_pool(context: ApiContext, organization_id: str, pool_id: str) -> None:
    """The row goes at once; its unclaimed members are removed by the next refill tick."""
    async with context.database.sessions() as session:
        pool = await _own_pool(session, organization_id, pool_id)
        await session.delete(pool)
        await session.commit()


async def _own_pool(session: AsyncSession, organization_id: str, pool_id: str) -> WarmPool:
    """The organization's own pool to change: 404 for another's, 400 for one the settings configure."""
    pool = await session.get(WarmPool, pool_id)
    if pool is None or pool.organization_id != organization_id:
        raise not_found(f"Warm pool {pool_id} not found")
    if pool.configured:
        raise bad_request(
            f"Warm pool {pool_id} is configured by the operator (TIDEPOOL_WARM_POOL_SNAPSHOTS, _MIN, _MAX)"
        )
    return pool


def _pool_row(
    organization_id: str, snapshot: Snapshot, region: str, size: int, *, configured: bool
) -> WarmPool:
    return WarmPool(
        id=str(uuid.uuid4()),
        organization_id=organization_id,
        snapshot_id=snapshot.id,
        snapshot=snapshot.name,
        image=snapshot_image(snapshot),
        target=region,
        pool=size,
        cpu=snapshot.cpu,
        memory=snapshot.memory,
        disk=snapshot.disk,
        configured=configured,
    )


def snapshot_image(snapshot: Snapshot) -> str:
    """The image a sandbox of `snapshot` starts from (as `create_sandbox` picks it)."""
    return snapshot.registry_ref or snapshot.ref or snapshot.image_name


# --- claim on create ---


def claimable(request: CreateSandboxRequest, pool: WarmPool) -> bool:
    """Whether a member of `pool` serves `request` as it is (anything else is a cold create)."""
    if request.build_info is not None or request.volumes or request.network_block_all or request.gpu:
        return False
    # A network policy must be in force before the sandbox's first process: a pooled one ran without it.
    if request.network_allow_list or request.domain_allow_list:
        return False
    if (request.user or "daytona") != pool.os_user:
        return False
    wanted = {"cpu": request.cpu, "memory": request.memory, "disk": request.disk}
    return all(value is None or value == getattr(pool, name) for name, value in wanted.items())


async def find_pool(session: AsyncSession, snapshot: Snapshot, target: str) -> WarmPool | None:
    rows = await session.exec(
        select(WarmPool).where(
            WarmPool.snapshot_id == snapshot.id,
            WarmPool.image == snapshot_image(snapshot),
            WarmPool.target == target,
            WarmPool.pool > 0,
        )
    )
    return rows.first()


async def claim(
    context: ApiContext,
    session: AsyncSession,
    organization_id: str,
    request: CreateSandboxRequest,
    snapshot: Snapshot,
    claimed_values: dict[str, object],
) -> Sandbox | None:
    """Move a started member of the pool serving `request` to `organization_id`, with `claimed_values`
    (name, labels, env, public, intervals) applied; None when there is no pool or no free member.
    The caller has checked the name is free; it commits the session."""
    target = request.target or context.settings.runner_region
    pool = await find_pool(session, snapshot, target)
    if pool is None or not claimable(request, pool):
        return None
    _demand.record(pool.id)
    for _ in range(CLAIM_ROUNDS):
        candidates = list(
            (
                await session.exec(
                    select(Sandbox.id)
                    .where(
                        Sandbox.warm_pool_id == pool.id,
                        Sandbox.organization_id == WARM_POOL_ORGANIZATION_ID,
                        Sandbox.state == SandboxState.STARTED.value,
                        Sandbox.image == pool.image,
                    )
                    .limit(CLAIM_CANDIDATES)
                )
            ).all()
        )
        if not candidates:
            return None
        random.shuffle(candidates)
        for sandbox_id in candidates:
            now = utc_now()
            result = await session.exec(  # type: ignore[call-overload]
                update(Sandbox)
                .where(
                    and_(
                        col(Sandbox.id) == sandbox_id,
                        col(Sandbox.organization_id) == WARM_POOL_ORGANIZATION_ID,
                        col(Sandbox.state) == SandboxState.STARTED.value,
                    )
                )
                .values(
                    organization_id=organization_id,
                    warm_pool_id=None,
                    claimed=True,
                    # Cleared until the runner reports the claim applied (the create waits for it).
                    daemon_version=None,
                    preview_token=previews.new_preview_token(),
                    created_at=now,
                    updated_at=now,
                    last_activity_at=now,
                    **claimed_values,
                )
            )
            if result.rowcount != 1:
                continue  # another create claimed it first
            sandbox = (
                await session.exec(
                    select(Sandbox).where(Sandbox.id == sandbox_id).execution_options(populate_existing=True)
                )
            ).one()
            record_created(session, sandbox)
            webhooks.record_sandbox_created(session, sandbox)
            log.info(
                "warm_pool.claimed", sandbox_id=sandbox_id, pool_id=pool.id, organization_id=organization_id
            )
            return sandbox
    return None


# --- refill ---


async def ensure_configured_pools(context: ApiContext) -> None:
    """One configured pool per snapshot in `warm_pool_snapshots` (owned by the admin organization), its
    image and resources following the snapshot's; configured pools no longer in the setting go."""
    settings = context.settings
    async with context.database.sessions() as session:
        admin = (
            await session.exec(
                select(Organization).where(
                    col(Organization.is_admin).is_(True), col(Organization.deleted_at).is_(None)
                )
            )
        ).first()
        if admin is None:
            return
        configured = {
            pool.snapshot_id: pool
            for pool in (await session.exec(select(WarmPool).where(col(WarmPool.configured).is_(True)))).all()
        }
        wanted: set[str] = set()
        for name in settings.warm_pool_snapshots:
            snapshot = (
                await session.exec(
                    select(Snapshot).where(
                        Snapshot.name == name,
                        col(Snapshot.general).is_(True),
                        Snapshot.state == "active",
                    )
                )
            ).first()
            if snapshot is None:
                continue  # not built yet: the next tick looks again
            wanted.add(snapshot.id)
            pool = configured.get(snapshot.id)
            if pool is None:
                session.add(
                    _pool_row(
                        admin.id, snapshot, settings.runner_region, settings.warm_pool_min, configured=True
                    )
                )
            elif pool.image != snapshot_image(snapshot) or pool.pool != settings.warm_pool_min:
                pool.image = snapshot_image(snapshot)
                pool.cpu, pool.memory, pool.disk = snapshot.cpu, snapshot.memory, snapshot.disk
                pool.pool = settings.warm_pool_min
                pool.updated_at = utc_now()
                session.add(pool)
        for snapshot_id, pool in configured.items():
            if snapshot_id not in wanted:
                await session.delete(pool)
        await session.commit()


async def refill_once(context: ApiContext) -> None:
    from tidepool_api.sandboxes import announce  # sandboxes imports this module

    settings = context.settings
    await ensure_configured_pools(context)
    creates: list[Sandbox] = []
    removals: list[Sandbox] = []
    async with context.database.sessions() as session:
        pools = {pool.id: pool for pool in (await session.exec(select(WarmPool))).all()}
        gone = select(Organization.id).where(col(Organization.deleted_at).is_not(None))
        deleted = set((await session.exec(gone)).all())
        for pool in [pool for pool in pools.values() if pool.organization_id in deleted]:
            await session.delete(pool)  # its organization is gone: so is the pool (members removed below)
            del pools[pool.id]
        members = list(
            (
                await session.exec(
                    select(Sandbox).where(
                        Sandbox.organization_id == WARM_POOL_ORGANIZATION_ID,
                        col(Sandbox.state).not_in(GONE),
                    )
                )
            ).all()
        )
        live: dict[str, list[Sandbox]] = defaultdict(list)
        for member in members:
            pool = pools.get(member.warm_pool_id or "")
            if pool is None or member.state in FAILED or member.image != pool.image:
                removals.append(member)
            else:
                live[pool.id].append(member)
        for pool in pools.values():
            floor, ceiling = pool_bounds(context, pool)
            demand = _demand.recent(pool.id, settings.warm_pool_demand_window_seconds)
            wanted = target_size(demand, floor, ceiling)
            have = live.get(pool.id, [])
            if len(have) < wanted:
                for _ in range(min(wanted - len(have), settings.warm_pool_refill_batch)):
                    member = _member(context, pool)
                    session.add(member)
                    creates.append(member)
            elif len(have) > wanted:
                surplus = [m for m in have if m.state == SandboxState.STARTED.value][: len(have) - wanted]
                removals.extend(surplus[: settings.warm_pool_refill_batch])
        await session.commit()
    for member in creates:
        await announce(context, member, SandboxAction.CREATE, DesiredState.STARTED)
    for member in removals:
        await _remove_member(context, member)
    if creates or removals:
        log.info("warm_pool.refilled", created=len(creates), removed=len(removals))


def _member(context: ApiContext, pool: WarmPool) -> Sandbox:
    sandbox_id = str(uuid.uuid4())
    assert_transition(SandboxState.UNKNOWN, SandboxState.CREATING)
    return Sandbox(
        id=sandbox_id,
        organization_id=WARM_POOL_ORGANIZATION_ID,
        name=f"warm-{sandbox_id}",
        state=SandboxState.CREATING.value,
        desired_state=DesiredState.STARTED.value,
        snapshot=pool.snapshot,
        image=pool.image,
        os_user=pool.os_user,
        cpu=pool.cpu,
        memory=pool.memory,
        disk=pool.disk,
        target=pool.target,
        preview_token=previews.new_preview_token(),
        # Never stopped, archived or deleted by the idle timers while it waits.
        auto_stop_interval=0,
        auto_delete_interval=-1,
        warm_pool_id=pool.id,
    )


async def _remove_member(context: ApiContext, member: Sandbox) -> None:
    """Destroy an unclaimed member, unless a create claimed it meanwhile (compare-and-set)."""
    from tidepool_api.sandboxes import announce

    assert_transition(SandboxState(member.state), SandboxState.DESTROYING)
    async with context.database.sessions() as session:
        # The same row condition a claim needs (unclaimed, in the state read): exactly one of them wins.
        result = await session.exec(  # type: ignore[call-overload]
            update(Sandbox)
            .where(
                and_(
                    col(Sandbox.id) == member.id,
                    col(Sandbox.organization_id) == WARM_POOL_ORGANIZATION_ID,
                    col(Sandbox.state) == member.state,
                )
            )
            .values(
                state=SandboxState.DESTROYING.value,
                desired_state=DesiredState.DESTROYED.value,
                updated_at=utc_now(),
            )
        )
        if result.rowcount != 1:
            return
        await session.commit()
        sandbox = await session.get(Sandbox, member.id)
    if sandbox is not None:
        await announce(context, sandbox, SandboxAction.DESTROY, DesiredState.DESTROYED, force=True)


async def refill_forever(context: ApiContext) -> None:
    while True:
        try:
            await refill_once(context)
        except Exception as error:  # a failed tick must not stop the pools: the next one retries
            log.exception("warm_pool.refill_failed", error=str(error))
        await asyncio.sleep(context.settings.warm_pool_tick_seconds)
