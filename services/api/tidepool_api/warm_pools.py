"""Warm pools (wire contract §2.8, design digest §1.8): started sandboxes that belong to no organization
(WARM_POOL_ORGANIZATION_ID), claimed by a matching `POST /sandbox` instead of a cold start.

- Pools are `warm_pool` rows: the operator's (setting `warm_pool_snapshots`, owned by the admin organization,
  `configured`) and those an organization makes with `POST /warm-pools`.
- Size: a pool made with `POST /warm-pools` keeps exactly `pool` members (the SDK's "number of warm
  sandboxes to keep ready"; 0 drains it). A configured pool follows demand: the creates that asked for its
  snapshot within `warm_pool_demand_window_seconds`, kept between `warm_pool_min` and `warm_pool_max`.
  `refill_forever` creates missing members and removes surplus, errored and outdated ones every
  `warm_pool_tick_seconds`.
- Who claims: an organization's create claims from its own pools and the operator's (configured, or made
  by the admin organization), its own first; never from another organization's.
- Quota: the unclaimed members of an organization's own pool hold its quota (`quotas.usage` counts them):
  `POST /warm-pools` and a PATCH that grows a pool are refused (403, the quota's message) when `pool`
  members would not fit, and each refill admits every new member under the organization's quota lock (a
  refused one is not made; the reason is the pool's `errorReason`). `warm_pool_max_members` caps the
  members of all pools together.
- Failures: a pool whose members fail to start waits (one tick, doubled per failure in a row, at most
  `warm_pool_backoff_max_seconds`) before it makes more; the failure is the pool's `errorReason`.
- Members run the snapshot's service entrypoint (as a cold create does) from their start.
- Claim (`claim`): only for a create that a member can serve as it is — same snapshot image and
  entrypoint, resources unset or equal to the pool's, same user, no volumes, no build, no `networkBlockAll`,
  and no env for a snapshot with a service entrypoint (it already runs, without the claimer's env). One
  compare-and-set UPDATE moves a started member to the claimer (organization, name, labels, env, public,
  intervals): two creates never get the same sandbox (the loser's UPDATE matches no row and it tries the
  next candidate).
  The desired record, preview access and route follow (`announce` CLAIM; the runner rewrites the route
  and gives the daemon the env, `POST /env`); the create answers once the runner has reported.

Pool members are excluded from every organization's list (they are not in one) and from the idle timers
(auto-stop 0). The refill loop runs in each API process: with several API replicas the pools may briefly
overshoot their size (the surplus is removed at the next tick), never a quota (admission is under the
organization's lock); the failure backoff is per process.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict, deque
from datetime import UTC, datetime

import structlog
from sqlalchemy import and_, case, or_, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api import previews, quotas, webhooks
from tidepool_api.context import ApiContext
from tidepool_api.db import WARM_POOL_ORGANIZATION_ID, Organization, Sandbox, Snapshot, WarmPool
from tidepool_api.errors import ApiError, bad_request, conflict, not_found
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


class Backoff:
    """Pools whose members failed to start, in this API process: failures in a row, when the next members
    may be made (monotonic), why, and the members made since (one of them started: the backoff ends)."""

    def __init__(self) -> None:
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}
        self._reasons: dict[str, str] = {}
        self._probes: dict[str, set[str]] = defaultdict(set)

    def failed(self, pool_id: str, failed: list[Sandbox], tick: float, ceiling: float) -> str:
        """Members of `pool_id` failed (one tick's): the next wait, doubled per such tick; the reason."""
        failures = self._failures.get(pool_id, 0) + 1
        delay = min(ceiling, tick * 2 ** (failures - 1))
        self._failures[pool_id] = failures
        self._until[pool_id] = time.monotonic() + delay
        self._probes.pop(pool_id, None)
        cause = (
            next((member.error_reason for member in failed if member.error_reason), None) or "no reason given"
        )
        self._reasons[pool_id] = (
            f"Warm pool members failed to start ({failures} time(s) in a row; last: {cause}). "
            f"Next try in {delay:g}s."
        )
        return self._reasons[pool_id]

    def reason(self, pool_id: str) -> str | None:
        return self._reasons.get(pool_id)

    def waiting(self, pool_id: str) -> bool:
        return time.monotonic() < self._until.get(pool_id, 0.0)

    def made(self, pool_id: str, member_id: str) -> None:
        if pool_id in self._failures:
            self._probes[pool_id].add(member_id)

    def settle(self, pool_id: str, live: list[Sandbox]) -> None:
        """End the backoff once a member made since the last failure has started."""
        probes = self._probes.get(pool_id)
        if probes and any(m.id in probes and m.state == SandboxState.STARTED.value for m in live):
            self.forget(pool_id)

    def forget(self, pool_id: str) -> None:
        for table in (self._failures, self._until, self._reasons, self._probes):
            table.pop(pool_id, None)


_backoff = Backoff()


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
    409 if the organization has a pool for that snapshot and region already, 403 (the quota's message)
    when `size` members would take the organization over its quota (`_admit_pool`)."""
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
        async with quotas.organization_lock(session, organization_id) as organization:
            await _admit_pool(context, session, organization, pool, 0, size)
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
        async with quotas.organization_lock(session, organization_id) as organization:
            await _admit_pool(context, session, organization, pool, pool.pool, size)
            pool.pool = size
            pool.updated_at = utc_now()
            session.add(pool)
            await session.commit()
        sizes = await current_sizes(session, [pool.id])
    return pool, sizes.get(pool.id, 0)


async def _admit_pool(
    context: ApiContext,
    session: AsyncSession,
    organization: Organization,
    pool: WarmPool,
    was: int,
    size: int,
) -> None:
    """Refuse (403, as a create over the quota) an organization's pool going from `was` to `size` members
    when that many started members would not fit its totals besides what it uses without this pool's, or
    one member exceeds its per-sandbox maxima. A shrinking pool always passes. Under the quota lock."""
    if size <= was:
        return
    quotas.check_per_sandbox(organization, pool.cpu, pool.memory, pool.disk)
    one = quotas.demand(pool.cpu, pool.memory, pool.disk, SandboxState.STARTED)

    def times(count: int) -> quotas.Resources:
        return quotas.Resources(one.cpu * count, one.memory * count, one.disk * count)

    await quotas.admit(
        session, context.settings, organization, times(was), times(size), exclude_pool_id=pool.id
    )


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


def claimable(request: CreateSandboxRequest, pool: WarmPool, entrypoint: list[str] | None = None) -> bool:
    """Whether a member of `pool` serves `request` as it is (anything else is a cold create). `entrypoint`:
    the snapshot's service entrypoint, which a member already runs."""
    # The entrypoint started with the member, before any claim: it would run without the request's env.
    if entrypoint and request.env:
        return False
    if request.build_info is not None or request.volumes or request.network_block_all or request.gpu:
        return False
    # A network policy must be in force before the sandbox's first process: a pooled one ran without it.
    if request.network_allow_list or request.domain_allow_list:
        return False
    if (request.user or "daytona") != pool.os_user:
        return False
    wanted = {"cpu": request.cpu, "memory": request.memory, "disk": request.disk}
    return all(value is None or value == getattr(pool, name) for name, value in wanted.items())


async def find_pools(
    session: AsyncSession, snapshot: Snapshot, target: str, organization_id: str
) -> list[WarmPool]:
    """The pools a create of `organization_id` may claim from for `snapshot` in `target`: its own first,
    then the operator's (configured ones and those the admin organization made); never another tenant's
    (their members hold that tenant's quota and were kept for it)."""
    operators = select(Organization.id).where(col(Organization.is_admin).is_(True))
    rows = await session.exec(
        select(WarmPool)
        .where(
            WarmPool.snapshot_id == snapshot.id,
            WarmPool.image == snapshot_image(snapshot),
            WarmPool.target == target,
            WarmPool.pool > 0,
            or_(
                WarmPool.organization_id == organization_id,
                col(WarmPool.configured).is_(True),
                col(WarmPool.organization_id).in_(operators),
            ),
        )
        .order_by(case((WarmPool.organization_id == organization_id, 0), else_=1), col(WarmPool.created_at))
    )
    return list(rows.all())


async def claim(
    context: ApiContext,
    session: AsyncSession,
    organization_id: str,
    request: CreateSandboxRequest,
    snapshot: Snapshot,
    claimed_values: dict[str, object],
) -> Sandbox | None:
    """Move a started member of a pool serving `request` (`find_pools`) to `organization_id`, with
    `claimed_values` (name, labels, env, public, intervals) applied; None when there is no such pool or no
    free member. The caller has checked the name is free; it commits the session."""
    from tidepool_api.sandboxes import service_entrypoint  # sandboxes imports this module

    target = request.target or context.settings.runner_region
    entrypoint = service_entrypoint(snapshot.entrypoint)
    for pool in await find_pools(session, snapshot, target, organization_id):
        if not claimable(request, pool, entrypoint):
            continue
        _demand.record(pool.id)
        claimed = await _claim_from(session, organization_id, pool, entrypoint, claimed_values)
        if claimed is not None:
            return claimed
    return None


async def _claim_from(
    session: AsyncSession,
    organization_id: str,
    pool: WarmPool,
    entrypoint: list[str] | None,
    claimed_values: dict[str, object],
) -> Sandbox | None:
    for _ in range(CLAIM_ROUNDS):
        candidates = list(
            (
                await session.exec(
                    select(Sandbox.id, Sandbox.entrypoint)
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
        # A member made before its snapshot's entrypoint was known runs none: not the snapshot's sandbox.
        candidates = [sandbox_id for sandbox_id, runs in candidates if (runs or None) == entrypoint]
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
    """One tick: remove the members of gone pools, failed and outdated ones, and a pool's surplus; make the
    missing ones within the installation's cap (`warm_pool_max_members`), not for a pool backing off after
    failures, and each admitted against its organization's quota (`_make_members`)."""
    from tidepool_api.sandboxes import announce, service_entrypoint  # sandboxes imports this module

    settings = context.settings
    await ensure_configured_pools(context)
    creates: list[Sandbox] = []
    removals: list[Sandbox] = []
    plans: list[tuple[str, int, list[str] | None, str | None]] = []  # pool, members to make, entrypoint, why
    async with context.database.sessions() as session:
        pools = {pool.id: pool for pool in (await session.exec(select(WarmPool))).all()}
        gone = select(Organization.id).where(col(Organization.deleted_at).is_not(None))
        deleted = set((await session.exec(gone)).all())
        for pool in [pool for pool in pools.values() if pool.organization_id in deleted]:
            await session.delete(pool)  # its organization is gone: so is the pool (members removed below)
            del pools[pool.id]
            _backoff.forget(pool.id)
        snapshot_ids = {pool.snapshot_id for pool in pools.values()}
        snapshots = {
            snapshot.id: snapshot
            for snapshot in (
                await session.exec(select(Snapshot).where(col(Snapshot.id).in_(snapshot_ids)))
            ).all()
        }
        # What a member of each pool runs: its snapshot's service entrypoint, as a cold create would.
        entrypoints = {
            pool.id: service_entrypoint(snapshots[pool.snapshot_id].entrypoint)
            for pool in pools.values()
            if pool.snapshot_id in snapshots
        }
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
        failed: dict[str, list[Sandbox]] = defaultdict(list)
        for member in members:
            pool = pools.get(member.warm_pool_id or "")
            outdated = pool is not None and (
                member.image != pool.image
                or (pool.id in entrypoints and (member.entrypoint or None) != entrypoints[pool.id])
            )
            if pool is None or outdated:
                removals.append(member)
            elif member.state in FAILED:
                removals.append(member)
                failed[pool.id].append(member)
            else:
                live[pool.id].append(member)
        # The members that stay count against the installation's cap (those removed now do not).
        room = max(0, settings.warm_pool_max_members - sum(len(have) for have in live.values()))
        reasons: dict[str, str | None] = {}
        for pool in sorted(pools.values(), key=lambda pool: pool.created_at):
            have = live.get(pool.id, [])
            if failed.get(pool.id):
                tick, ceiling = settings.warm_pool_tick_seconds, settings.warm_pool_backoff_max_seconds
                log.warning("warm_pool.members_failed", pool_id=pool.id, failed=len(failed[pool.id]))
                _backoff.failed(pool.id, failed[pool.id], tick, ceiling)
            else:
                _backoff.settle(pool.id, have)
            reason = _backoff.reason(pool.id)
            floor, ceiling = pool_bounds(context, pool)
            demand = _demand.recent(pool.id, settings.warm_pool_demand_window_seconds)
            wanted = target_size(demand, floor, ceiling)
            if len(have) < wanted and not _backoff.waiting(pool.id):
                missing = min(wanted - len(have), settings.warm_pool_refill_batch)
                count = min(missing, room)
                room -= count
                if count < missing:
                    reason = reason or (
                        f"The installation's limit of {settings.warm_pool_max_members} warm pool members "
                        "is reached (TIDEPOOL_WARM_POOL_MAX_MEMBERS)."
                    )
                if count:
                    plans.append((pool.id, count, entrypoints.get(pool.id), reason))
                    continue  # `_make_members` records the reason, or the quota's refusal
            elif len(have) > wanted:
                surplus = [m for m in have if m.state == SandboxState.STARTED.value][: len(have) - wanted]
                removals.extend(surplus[: settings.warm_pool_refill_batch])
            reasons[pool.id] = reason
        for pool_id, reason in reasons.items():
            _record_reason(pools[pool_id], reason)
        await session.commit()
    for pool_id, count, entrypoint, reason in plans:
        creates.extend(await _make_members(context, pool_id, count, entrypoint, reason))
    for member in creates:
        await announce(context, member, SandboxAction.CREATE, DesiredState.STARTED)
    for member in removals:
        await _remove_member(context, member)
    if creates or removals:
        log.info("warm_pool.refilled", created=len(creates), removed=len(removals))


def _record_reason(pool: WarmPool, reason: str | None) -> None:
    """Why the pool is not full (None: nothing wrong), as `errorReason` shows it; written when it changes."""
    if pool.error_reason != reason:
        pool.error_reason = reason
        pool.updated_at = utc_now()


async def _make_members(
    context: ApiContext, pool_id: str, count: int, entrypoint: list[str] | None, reason: str | None
) -> list[Sandbox]:
    """Insert up to `count` new members of the pool (committed; the caller announces them). An
    organization's pool admits each under its quota lock as a create would (its members hold its quota):
    the first refused one stops the refill, its message becomes the pool's reason. The operator's
    configured pools hold no organization's quota."""
    made: list[Sandbox] = []
    async with context.database.sessions() as session:
        pool = await session.get(WarmPool, pool_id)
        if pool is None:
            return made  # deleted meanwhile
        if pool.configured:
            for _ in range(count):
                made.append(_member(context, pool, entrypoint))
                session.add(made[-1])
            _record_reason(pool, reason)
            await session.commit()
        else:
            async with quotas.organization_lock(session, pool.organization_id) as organization:
                one = quotas.demand(pool.cpu, pool.memory, pool.disk, SandboxState.CREATING)
                try:
                    quotas.check_per_sandbox(organization, pool.cpu, pool.memory, pool.disk)
                    for _ in range(count):
                        await quotas.admit(session, context.settings, organization, quotas.Resources(), one)
                        made.append(_member(context, pool, entrypoint))
                        session.add(made[-1])
                        await session.flush()  # the next admission counts it
                except ApiError as refusal:
                    reason = refusal.message
                    log.info(
                        "warm_pool.refill_refused", pool_id=pool.id, reason=refusal.message.split("\n")[0]
                    )
                _record_reason(pool, reason)
                await session.commit()
    for member in made:
        _backoff.made(pool_id, member.id)
    return made


def _member(context: ApiContext, pool: WarmPool, entrypoint: list[str] | None = None) -> Sandbox:
    """A new member of `pool` (state `creating`); `entrypoint`: the snapshot's service entrypoint, which
    the runner starts with the sandbox (a claimed member has been running it since)."""
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
        entrypoint=entrypoint,
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
