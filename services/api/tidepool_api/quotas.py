"""Organization quotas (behaviour spec "limits", design digest §7): pooled vCPU / memory / disk of the
organization's sandboxes (and the unclaimed members of the warm pools it made), per-sandbox maxima, snapshot
and volume counts.

Usage is never a counter that can drift: it is the sum over the organization's sandbox rows, by state
(Daytona's accounting: compute in the running-ish states, disk also in `stopped` / `archiving`, nothing
when archived, in error or deleted). Stopping a sandbox frees its cpu and memory, archiving or deleting it
frees its disk, at once (the state write is the release).

Admission is atomic under concurrent requests: `organization_lock` serializes the check-and-insert of one
organization (PostgreSQL: `SELECT ... FOR NO KEY UPDATE` on the organization row, held to the commit; SQLite,
embedded and single-process: an in-process lock per organization), so a burst cannot overshoot.

Errors are Daytona's: 403 `Total CPU limit exceeded. Maximum allowed: 10.` (memory / disk alike), 403
`CPU request 8 exceeds maximum allowed per sandbox (4).`, 400 `Snapshot quota exceeded. Maximum allowed: 30`,
400 `Volume quota exceeded. Maximum allowed: 100`.

Defaults: an organization's own value (`PATCH /organizations/{id}/quota`), else the installation's tier
(`TIDEPOOL_QUOTA_TIER`, the docs' tier table). The admin organization (the operator's) has no totals nor
snapshot count unless set on its row (its volume count is the installation's, as every organization's).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from weakref import WeakValueDictionary

from sqlalchemy import and_, case, func, or_
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api.db import WARM_POOL_ORGANIZATION_ID, Organization, Sandbox, Snapshot, Volume, WarmPool
from tidepool_api.errors import ApiError, bad_request
from tidepool_contracts.states import COMPUTE_STATES, DISK_STATES, SandboxState
from tidepool_runtime.settings import ApiSettings


@dataclass(frozen=True)
class Tier:
    """One row of limits.mdx: totals (vCPU, GiB, GiB) and requests per minute by throttler."""

    cpu: int
    memory: int
    disk: int
    authenticated: int
    sandbox_create: int
    sandbox_lifecycle: int


TIERS: dict[int, Tier] = {
    1: Tier(10, 10, 30, 10_000, 300, 10_000),
    2: Tier(100, 200, 300, 20_000, 400, 20_000),
    3: Tier(250, 500, 2000, 40_000, 500, 40_000),
    4: Tier(500, 1000, 5000, 50_000, 600, 50_000),
}
DEFAULT_SNAPSHOT_QUOTA = 30
DEFAULT_MAX_SNAPSHOT_SIZE = 20  # GB


UPGRADE_MESSAGE = "To increase concurrency limits, ask the administrator to raise the organization's quota."
PER_SANDBOX_MESSAGE = (
    "To increase per-sandbox limits, ask the administrator to raise the organization's limits."
)
ARCHIVE_MESSAGE = "Consider archiving your unused sandboxes to free up available storage."


@dataclass(frozen=True)
class Resources:
    """vCPU, GiB memory, GiB disk."""

    cpu: int = 0
    memory: int = 0
    disk: int = 0


@dataclass(frozen=True)
class Limits:
    """An organization's effective limits; None = unlimited."""

    total_cpu: int | None
    total_memory: int | None
    total_disk: int | None
    max_cpu_per_sandbox: int
    max_memory_per_sandbox: int
    max_disk_per_sandbox: int
    snapshot_quota: int | None
    max_snapshot_size: int | None
    volume_quota: int | None


def tier(settings: ApiSettings) -> Tier:
    chosen = TIERS.get(settings.quota_tier, TIERS[1])
    if settings.quota_tier == 1:
        return Tier(**{**chosen.__dict__, "memory": settings.quota_tier1_memory_gib})
    return chosen


def limits_of(organization: Organization, settings: ApiSettings) -> Limits:
    """The organization's own values, else the installation's (none for the admin organization)."""
    default = tier(settings)
    admin = organization.is_admin

    def pick(own: int | None, fallback: int) -> int | None:
        return own if own is not None else (None if admin else fallback)

    return Limits(
        total_cpu=pick(organization.total_cpu_quota, default.cpu),
        total_memory=pick(organization.total_memory_quota, default.memory),
        total_disk=pick(organization.total_disk_quota, default.disk),
        max_cpu_per_sandbox=organization.max_cpu_per_sandbox,
        max_memory_per_sandbox=organization.max_memory_per_sandbox,
        max_disk_per_sandbox=organization.max_disk_per_sandbox,
        snapshot_quota=pick(organization.snapshot_quota, DEFAULT_SNAPSHOT_QUOTA),
        max_snapshot_size=pick(organization.max_snapshot_size, DEFAULT_MAX_SNAPSHOT_SIZE),
        # Every organization, the admin's too, as before quotas (TIDEPOOL_VOLUME_LIMIT_PER_ORGANIZATION).
        volume_quota=organization.volume_quota
        if organization.volume_quota is not None
        else settings.volume_limit_per_organization,
    )


def demand(cpu: int, memory: int, disk: int, state: SandboxState) -> Resources:
    """What a sandbox of these resources uses in `state`."""
    compute = state in COMPUTE_STATES
    return Resources(cpu if compute else 0, memory if compute else 0, disk if state in DISK_STATES else 0)


async def usage(
    session: AsyncSession,
    organization_id: str,
    exclude_id: str | None = None,
    exclude_pool_id: str | None = None,
) -> Resources:
    """The organization's current use, summed from its sandbox rows and the unclaimed members of the warm
    pools it made (`POST /warm-pools`: they are kept started for it, so they hold its quota; the operator's
    configured pools hold nobody's). `exclude_id`: leave one sandbox out; `exclude_pool_id`: one pool's
    members (the pool being resized)."""

    def total(column: object, states: frozenset[SandboxState]) -> object:
        return func.coalesce(
            func.sum(case((col(Sandbox.state).in_([s.value for s in states]), column), else_=0)), 0
        )

    statement = select(
        total(Sandbox.cpu, COMPUTE_STATES),  # type: ignore[call-overload]
        total(Sandbox.memory, COMPUTE_STATES),
        total(Sandbox.disk, DISK_STATES),
    ).where(
        or_(
            Sandbox.organization_id == organization_id,
            and_(
                Sandbox.organization_id == WARM_POOL_ORGANIZATION_ID,
                col(Sandbox.warm_pool_id).in_(
                    select(WarmPool.id).where(
                        WarmPool.organization_id == organization_id, col(WarmPool.configured).is_(False)
                    )
                ),
            ),
        )
    )
    if exclude_id is not None:
        statement = statement.where(Sandbox.id != exclude_id)
    if exclude_pool_id is not None:
        statement = statement.where(
            or_(col(Sandbox.warm_pool_id).is_(None), col(Sandbox.warm_pool_id) != exclude_pool_id)
        )
    cpu, memory, disk = (await session.exec(statement)).one()
    return Resources(int(cpu), int(memory), int(disk))


def check_per_sandbox(
    organization: Organization, cpu: int, memory: int, disk: int, status_code: int = 403
) -> None:
    """403 as Daytona's create, for one sandbox over the organization's per-sandbox maxima (a resize
    keeps its 400: `status_code`)."""
    checks = (
        ("CPU", cpu, organization.max_cpu_per_sandbox, ""),
        ("Memory", memory, organization.max_memory_per_sandbox, "GB"),
        ("Disk", disk, organization.max_disk_per_sandbox, "GB"),
    )
    for name, wanted, maximum, unit in checks:
        if wanted > maximum:
            raise ApiError(
                status_code,
                f"{name} request {wanted}{unit} exceeds maximum allowed per sandbox ({maximum}{unit}).\n"
                f"{PER_SANDBOX_MESSAGE}",
            )


async def admit(
    session: AsyncSession,
    settings: ApiSettings,
    organization: Organization,
    before: Resources,
    after: Resources,
    exclude_id: str | None = None,
    exclude_pool_id: str | None = None,
) -> None:
    """Refuse (403, Daytona's message) a change of one sandbox's use from `before` to `after` that would
    take the organization over a total. Only what grows is checked: a start that adds no disk passes an
    organization already over its disk quota. Call under `organization_lock`, and commit under it."""
    limits = limits_of(organization, settings)
    if limits.total_cpu is None and limits.total_memory is None and limits.total_disk is None:
        return
    used = await usage(session, organization.id, exclude_id, exclude_pool_id)
    checks = (
        ("CPU", used.cpu, before.cpu, after.cpu, limits.total_cpu, "", ""),
        ("memory", used.memory, before.memory, after.memory, limits.total_memory, "GiB", ""),
        ("disk", used.disk, before.disk, after.disk, limits.total_disk, "GiB", f"{ARCHIVE_MESSAGE}\n"),
    )
    for name, in_use, was, wants, quota, unit, advice in checks:
        if quota is not None and wants > was and in_use + wants > quota:
            raise ApiError(
                403,
                f"Total {name} limit exceeded. Maximum allowed: {quota}{unit}.\n{advice}{UPGRADE_MESSAGE}",
            )


async def check_snapshot_count(
    session: AsyncSession, settings: ApiSettings, organization: Organization
) -> None:
    """400 `Snapshot quota exceeded. Maximum allowed: N` when one more would be too many (hidden build
    caches and fork snapshots do not count). Under `organization_lock`."""
    quota = limits_of(organization, settings).snapshot_quota
    if quota is None:
        return
    count = (
        await session.exec(
            select(func.count())
            .select_from(Snapshot)
            .where(Snapshot.organization_id == organization.id, col(Snapshot.hidden).is_(False))
        )
    ).one()
    if count >= quota:
        raise bad_request(f"Snapshot quota exceeded. Maximum allowed: {quota}")


async def check_volume_count(
    session: AsyncSession, settings: ApiSettings, organization: Organization, deleted_state: str
) -> None:
    """400 `Volume quota exceeded. Maximum allowed: N` (deleted volumes do not count). Under the lock."""
    quota = limits_of(organization, settings).volume_quota
    if quota is None:
        return
    live = (
        await session.exec(
            select(func.count())
            .select_from(Volume)
            .where(Volume.organization_id == organization.id, Volume.state != deleted_state)
        )
    ).one()
    if live >= quota:
        raise bad_request(f"Volume quota exceeded. Maximum allowed: {quota}")


# SQLite: one API process, so an in-process lock per organization serializes its admissions.
_local_locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()


@contextlib.asynccontextmanager
async def organization_lock(session: AsyncSession, organization_id: str) -> AsyncIterator[Organization]:
    """Hold the organization's admission lock until the block ends; commit inside it. Yields the
    organization row, read under the lock (404-free: a deleted organization is the caller's concern)."""
    bind = session.bind
    if bind is not None and bind.dialect.name == "sqlite":
        lock = _local_locks.get(organization_id)
        if lock is None:
            lock = asyncio.Lock()
            _local_locks[organization_id] = lock
        async with lock:
            organization = await session.get(Organization, organization_id, populate_existing=True)
            if organization is None:
                raise ApiError(401, "organization of this API key no longer exists")
            yield organization
        return
    # PostgreSQL (or any server database): the row lock is held until this session's transaction ends.
    organization = (
        await session.exec(
            select(Organization)
            .where(Organization.id == organization_id)
            # NO KEY UPDATE: admissions exclude each other, inserts referencing the row (FK) still pass.
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        )
    ).first()
    if organization is None:
        raise ApiError(401, "organization of this API key no longer exists")
    yield organization


async def counts(session: AsyncSession, organization_id: str) -> tuple[int, int]:
    """(snapshots, volumes) the organization has, as the quotas count them."""
    snapshots = (
        await session.exec(
            select(func.count())
            .select_from(Snapshot)
            .where(Snapshot.organization_id == organization_id, col(Snapshot.hidden).is_(False))
        )
    ).one()
    volumes = (
        await session.exec(
            select(func.count())
            .select_from(Volume)
            .where(Volume.organization_id == organization_id, Volume.state != "deleted")
        )
    ).one()
    return int(snapshots), int(volumes)
