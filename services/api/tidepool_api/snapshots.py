"""Snapshot use cases: register images, build Dockerfiles (content-addressed, cached), track their state."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import or_
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api import quotas, webhooks
from tidepool_api.context import ApiContext
from tidepool_api.db import Sandbox, Snapshot
from tidepool_api.errors import ApiError, bad_request, conflict, not_found
from tidepool_api.schemas import (
    BuildInfoRequest,
    Cores,
    Entrypoint,
    GpuCount,
    ImageName,
    SnapshotName,
    WireModel,
)
from tidepool_contracts import channels
from tidepool_contracts.models import BuildJob, SnapshotState
from tidepool_contracts.states import SandboxState
from tidepool_runtime.image_refs import (
    ReferenceRefusedError,
    build_ref,
    check_reference,
    dockerfile_image_references,
    snapshot_ref,
)

log = structlog.get_logger("tidepool.api.snapshots")
SNAPSHOT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._:/@-]{0,254}$")
IMAGE_REFERENCE = re.compile(
    # A `:port` belongs to a registry host, which a `/` follows: in `node:22` the 22 is a tag.
    r"^(?P<name>(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
FLOATING_TAGS = {"latest", "lts", "stable"}


class CreateSnapshotRequest(WireModel):
    """`CreateSnapshot` (SDK 0.226.1): an image to register, or a Dockerfile to build (`buildInfo`)."""

    name: SnapshotName
    image_name: ImageName | None = None
    entrypoint: Entrypoint | None = None
    cpu: Cores | None = None
    gpu: GpuCount | None = None
    memory: Cores | None = None
    disk: Cores | None = None
    build_info: BuildInfoRequest | None = None


def utc_now() -> datetime:
    return datetime.now(UTC)


def validate_image_reference(image: str) -> None:
    match = IMAGE_REFERENCE.match(image)
    if match is None:
        raise bad_request(f"Invalid image name {image}: use lowercase name[:tag] or name@sha256:<64 hex>")
    tag, digest = match.group("tag"), match.group("digest")
    if not tag and not digest:
        raise bad_request(f"Image {image} must include a tag or a digest")
    if tag in FLOATING_TAGS and not digest:
        raise bad_request(f"Image tag '{tag}' is not supported: pin a specific tag or digest")


def check_image(context: ApiContext, organization_id: str, image: str) -> None:
    """Refuse images the organization may not use (tidepool_runtime.image_refs): 400, or 404 for another
    organization's image (whether it exists or not)."""
    settings = context.settings
    try:
        check_reference(
            image,
            organization_id,
            internal_registry=settings.registry_url,
            platform_images=(settings.default_image, settings.base_image),
            allowed_host_registries=settings.allowed_host_registries,
        )
    except ReferenceRefusedError as error:
        raise ApiError(error.status, error.message) from error


def check_build_sources(context: ApiContext, organization_id: str, dockerfile: str) -> None:
    """Every image the Dockerfile reads (FROM, COPY --from, RUN --mount from) must be one it may use."""
    try:
        references = dockerfile_image_references(dockerfile)
    except ValueError as error:
        raise bad_request(f"buildInfo.dockerfileContent: {error}") from error
    for reference in references:
        check_image(context, organization_id, reference)


def visible_to(organization_id: str):  # type: ignore[no-untyped-def]
    return or_(Snapshot.organization_id == organization_id, col(Snapshot.general).is_(True))


async def find_snapshot(session: AsyncSession, organization_id: str, id_or_name: str) -> Snapshot:
    snapshot = (
        await session.exec(
            select(Snapshot).where(
                or_(Snapshot.id == id_or_name, Snapshot.name == id_or_name),
                visible_to(organization_id),
                col(Snapshot.hidden).is_(False),
            )
        )
    ).first()
    if snapshot is None:
        raise not_found(f"Snapshot {id_or_name} not found")
    return snapshot


async def request_build(context: ApiContext, snapshot: Snapshot) -> None:
    job = BuildJob(
        snapshot_id=snapshot.id,
        snapshot_name=snapshot.name,
        image_ref=snapshot.ref or snapshot.image_name,
        dockerfile=snapshot.dockerfile or "",
        organization_id=snapshot.organization_id,
        context_hashes=list(snapshot.context_hashes or []),
        source_image=None if snapshot.dockerfile else snapshot.image_name,
    )
    await context.bus.publish(channels.BUILD_JOBS, job, msg_id=f"build:{snapshot.id}:{snapshot.updated_at}")


async def create_snapshot(context: ApiContext, organization_id: str, body: CreateSnapshotRequest) -> Snapshot:
    if not SNAPSHOT_NAME.match(body.name):
        raise bad_request("Snapshot name may contain letters, digits, dots, colons, slashes and dashes only")
    if body.gpu:
        raise bad_request("GPU snapshots are not available on this installation")
    for field_name, value in (("cpu", body.cpu), ("memory", body.memory), ("disk", body.disk)):
        if value is not None and value < 1:
            raise bad_request(f"{field_name} must be at least 1")
    if body.build_info is None and not body.image_name:
        raise bad_request("Either imageName or buildInfo is required")
    snapshot_id = str(uuid.uuid4())
    dockerfile: str | None = None
    hashes: list[str] = []
    if body.build_info is not None:
        dockerfile = body.build_info.dockerfile_content
        hashes = list(body.build_info.context_hashes or [])
        if not dockerfile.strip():
            raise bad_request("buildInfo.dockerfileContent is empty")
        check_build_sources(context, organization_id, dockerfile)
        ref = build_ref(organization_id, dockerfile, hashes)
        image_name = body.image_name or ref
    else:
        assert body.image_name is not None
        validate_image_reference(body.image_name)
        check_image(context, organization_id, body.image_name)
        image_name = body.image_name
        # The image under this organization's own local name: nothing keyed by a shared name.
        ref = snapshot_ref(organization_id, snapshot_id)
    async with context.database.sessions() as session:
        taken = await session.exec(
            select(Snapshot.id).where(Snapshot.name == body.name, visible_to(organization_id))
        )
        if taken.first() is not None:
            raise conflict(f"Snapshot with name {body.name} already exists")
        snapshot = Snapshot(
            id=snapshot_id,
            organization_id=organization_id,
            name=body.name,
            image_name=image_name,
            ref=ref,
            dockerfile=dockerfile,
            context_hashes=hashes,
            entrypoint=body.entrypoint,
            state=SnapshotState.PENDING.value,
            cpu=body.cpu or 1,
            memory=body.memory or 1,
            disk=body.disk or 3,
        )
        async with quotas.organization_lock(session, organization_id) as locked:
            await quotas.check_snapshot_count(session, context.settings, locked)
            session.add(snapshot)
            webhooks.record_snapshot_created(session, snapshot)
            await session.commit()
    await request_build(context, snapshot)
    return snapshot


async def delete_snapshot(context: ApiContext, organization_id: str, id_or_name: str) -> None:
    async with context.database.sessions() as session:
        snapshot = await find_snapshot(session, organization_id, id_or_name)
        if snapshot.general or snapshot.organization_id != organization_id:
            raise ApiError(403, f"Snapshot {snapshot.name} is shared by the platform and cannot be deleted")
        in_use = await session.exec(
            select(Sandbox.id).where(
                Sandbox.organization_id == organization_id,
                Sandbox.snapshot == snapshot.name,
                col(Sandbox.state).not_in([SandboxState.DESTROYED.value, SandboxState.DESTROYING.value]),
            )
        )
        if in_use.first() is not None:
            raise conflict(f"Snapshot {snapshot.name} is used by existing sandboxes; delete them first")
        webhooks.record_snapshot_removed(session, snapshot)
        await session.delete(snapshot)
        await session.commit()


async def set_active(context: ApiContext, organization_id: str, id_or_name: str, active: bool) -> Snapshot:
    async with context.database.sessions() as session:
        snapshot = await find_snapshot(session, organization_id, id_or_name)
        if snapshot.general:
            raise ApiError(403, f"Snapshot {snapshot.name} is shared by the platform")
        if active and snapshot.state != SnapshotState.INACTIVE.value:
            if snapshot.state == SnapshotState.ACTIVE.value:
                return snapshot
            raise bad_request(f"Snapshot {snapshot.name} is not inactive (state: {snapshot.state})")
        if not active and snapshot.state != SnapshotState.ACTIVE.value:
            raise bad_request(f"Snapshot {snapshot.name} is not active (state: {snapshot.state})")
        # Activation re-verifies the image (it may have been removed while inactive).
        old_state = snapshot.state
        snapshot.state = SnapshotState.PENDING.value if active else SnapshotState.INACTIVE.value
        snapshot.updated_at = utc_now()
        webhooks.record_snapshot_state(session, snapshot, old_state, snapshot.state)
        session.add(snapshot)
        await session.commit()
    if active:
        await request_build(context, snapshot)
    return snapshot


async def ensure_build(
    context: ApiContext, session: AsyncSession, organization_id: str, dockerfile: str, hashes: list[str]
) -> Snapshot:
    """The hidden snapshot behind a declarative sandbox: reused while cached, built when missing.

    The cache is per organization: the ref covers the organization, and only its own rows are reused.
    """
    check_build_sources(context, organization_id, dockerfile)
    ref = build_ref(organization_id, dockerfile, hashes)
    snapshot = (
        await session.exec(
            select(Snapshot).where(
                Snapshot.ref == ref,
                Snapshot.organization_id == organization_id,
                col(Snapshot.hidden).is_(True),
            )
        )
    ).first()
    now = utc_now()
    if snapshot is None:
        snapshot = Snapshot(
            id=str(uuid.uuid4()),
            organization_id=organization_id,
            name=ref,
            image_name=ref,
            ref=ref,
            hidden=True,
            dockerfile=dockerfile,
            context_hashes=hashes,
            state=SnapshotState.PENDING.value,
        )
    snapshot.last_used_at = now
    session.add(snapshot)
    await session.commit()
    if snapshot.state not in (SnapshotState.ACTIVE.value, SnapshotState.BUILDING.value):
        # Pending, failed earlier, or expired from the cache: (re)build; the builder reuses existing images.
        snapshot.state = SnapshotState.PENDING.value
        snapshot.updated_at = now
        session.add(snapshot)
        await session.commit()
        await request_build(context, snapshot)
    return snapshot


async def pending_build_sandboxes(session: AsyncSession, build: Snapshot) -> list[Sandbox]:
    """The organization's sandboxes waiting for the hidden build snapshot `build`."""
    if not build.hidden or build.ref is None:
        return []
    states = [SandboxState.PENDING_BUILD.value, SandboxState.BUILDING_SNAPSHOT.value]
    rows = await session.exec(
        select(Sandbox).where(
            Sandbox.build_ref == build.ref,
            Sandbox.organization_id == build.organization_id,
            col(Sandbox.state).in_(states),
        )
    )
    return list(rows.all())


async def evict_expired_builds(context: ApiContext, now: datetime | None = None) -> list[str]:
    """The declarative build cache: drop hidden build snapshots unused for `build_cache_hours`."""
    moment = now or utc_now()
    cutoff = moment - timedelta(hours=context.settings.build_cache_hours)
    evicted: list[str] = []
    async with context.database.sessions() as session:
        candidates = (
            await session.exec(
                select(Snapshot).where(col(Snapshot.hidden).is_(True), Snapshot.last_used_at < cutoff)
            )
        ).all()
        for snapshot in candidates:
            in_use = await session.exec(
                select(Sandbox.id).where(
                    Sandbox.build_ref == snapshot.ref,
                    col(Sandbox.state).not_in([SandboxState.DESTROYED.value, SandboxState.DESTROYING.value]),
                )
            )
            if in_use.first() is not None:
                continue  # a sandbox still runs from it
            await session.delete(snapshot)
            evicted.append(snapshot.ref or snapshot.image_name)
            shared = await session.exec(
                select(Snapshot.id).where(Snapshot.ref == snapshot.ref, Snapshot.id != snapshot.id)
            )
            if shared.first() is not None:
                continue  # a named snapshot of the organization is the same build: keep the image
            job = BuildJob(
                snapshot_id=snapshot.id,
                snapshot_name=snapshot.name,
                image_ref=snapshot.ref or snapshot.image_name,
                dockerfile="",
                remove=True,
                registry_ref=snapshot.registry_ref,
            )
            await context.bus.publish(channels.BUILD_JOBS, job, msg_id=f"evict:{snapshot.id}")
        await session.commit()
    return evicted


async def evict_expired_builds_forever(context: ApiContext, interval_seconds: float = 600.0) -> None:
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await evict_expired_builds(context)
        except Exception as error:  # the next round tries again
            log.warning("build_cache.eviction_failed", error=str(error))
