"""First-start set-up: the admin organization and key, the default snapshots, and the proxy's key mirror."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import structlog
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from tidepool_api.auth import generate_key, hash_key, key_record
from tidepool_api.context import ApiContext
from tidepool_api.db import WARM_POOL_ORGANIZATION_ID, ApiKey, Organization, Snapshot
from tidepool_contracts import channels
from tidepool_contracts.models import BuildJob, SnapshotState
from tidepool_contracts.permissions import ALL_PERMISSIONS
from tidepool_runtime.broker import kv_put

log = structlog.get_logger("tidepool.api.bootstrap")

# Daytona's pre-built sizes; all share the default image on a fresh install.
DEFAULT_SNAPSHOT_SIZES: dict[str, tuple[int, int, int]] = {
    "daytona-small": (1, 1, 3),
    "daytona-medium": (2, 4, 8),
    "daytona-large": (4, 8, 10),
}


def admin_key_file(context: ApiContext) -> Path:
    return context.settings.data_dir / "admin-api-key"


async def ensure_admin(context: ApiContext) -> None:
    """Create the admin organization and its key once; the plain key is written only to a 0600 file."""
    async with context.database.sessions() as session:
        others = select(Organization).where(Organization.id != WARM_POOL_ORGANIZATION_ID)
        if (await session.exec(others)).first() is not None:
            return
        organization = Organization(id=str(uuid.uuid4()), name="admin", is_admin=True)
        key = generate_key()
        session.add(organization)
        await session.flush()
        session.add(
            ApiKey(
                id=str(uuid.uuid4()),
                organization_id=organization.id,
                name="admin",
                key_hash=hash_key(key),
                key_prefix=key[:8],
                permissions=list(ALL_PERMISSIONS),
            )
        )
        await session.commit()
    path = admin_key_file(context)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    log.info("bootstrap.admin_created", organization_id=organization.id, key_file=str(path))


async def ensure_warm_pool_organization(context: ApiContext) -> None:
    """The owner of unclaimed warm-pool sandboxes (no key, no limits: nobody creates through it)."""
    async with context.database.sessions() as session:
        if await session.get(Organization, WARM_POOL_ORGANIZATION_ID) is not None:
            return
        session.add(
            Organization(
                id=WARM_POOL_ORGANIZATION_ID,
                name="warm-pool (unclaimed sandboxes)",
                max_cpu_per_sandbox=0,
                max_memory_per_sandbox=0,
                max_disk_per_sandbox=0,
            )
        )
        with contextlib.suppress(IntegrityError):  # another API replica made it meanwhile
            await session.commit()


async def mirror_api_keys(context: ApiContext) -> None:
    """The proxy authenticates from KV, never from the database: publish every key's hash record."""
    async with context.database.sessions() as session:
        keys = (await session.exec(select(ApiKey))).all()
    for api_key in keys:
        await kv_put(context.api_keys_kv, api_key.key_hash, key_record(api_key))


async def ensure_default_snapshots(context: ApiContext) -> None:
    settings = context.settings
    async with context.database.sessions() as session:
        existing = {row.name: row for row in (await session.exec(select(Snapshot))).all()}
        for name, (cpu, memory, disk) in DEFAULT_SNAPSHOT_SIZES.items():
            snapshot = existing.get(name)
            if snapshot is None:
                snapshot = Snapshot(
                    id=str(uuid.uuid4()),
                    name=name,
                    image_name=settings.default_image,
                    ref=settings.default_image,
                    state=SnapshotState.PENDING.value,
                    cpu=cpu,
                    memory=memory,
                    disk=disk,
                    general=True,
                )
            elif snapshot.ref != settings.default_image:
                snapshot.image_name = snapshot.ref = settings.default_image
                snapshot.state = SnapshotState.PENDING.value
            session.add(snapshot)
        await session.commit()
    dockerfile = settings.default_dockerfile.read_text()
    # The builder answers at once when the image is already present; the msg id makes restarts idempotent.
    job = BuildJob(
        snapshot_name=settings.default_snapshot,
        image_ref=settings.default_image,
        dockerfile=dockerfile,
        context_dir=str(settings.default_dockerfile.parent),
    )
    await context.bus.publish(channels.BUILD_JOBS, job, msg_id=f"default-image:{settings.default_image}")
