"""Volume use cases (wire contract §2.6): create, find, delete, and the mounts a sandbox asks for.

A volume is the key prefix `volumes/<id>/` in its organization's bucket of Tidepool's object storage (the
gateway maps the organization-scoped service key to that organization's root, so one tenant never reaches
another's volumes). The API only writes rows and objects; runners FUSE-mount the prefix (SandboxSpec.volumes).
"""

from __future__ import annotations

import asyncio
import io
import posixpath
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit

import structlog
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api import quotas, webhooks
from tidepool_api.context import ApiContext
from tidepool_api.db import Sandbox, Volume
from tidepool_api.errors import ApiError, bad_request, conflict, not_found
from tidepool_api.schemas import VolumeMount
from tidepool_contracts.models import VolumeMountSpec
from tidepool_contracts.states import SandboxState
from tidepool_runtime.object_keys import service_key
from tidepool_runtime.settings import ApiSettings

log = structlog.get_logger("tidepool.api.volumes")

# Daytona's states; `pending_create` is never used here (creation is one step).
CREATING, READY, PENDING_DELETE, DELETING, DELETED, ERROR = (
    "creating",
    "ready",
    "pending_delete",
    "deleting",
    "deleted",
    "error",
)
# Keeps an empty volume's prefix in existence on any S3 (a prefix exists only while an object lies under
# it); runners hide it from the mount.
MARKER = ".tidepool-volume"
# Mount paths a volume may not cover (exactly or below), as Daytona's API.
FORBIDDEN_MOUNT_ROOTS = ("/proc", "/sys", "/dev", "/boot", "/etc", "/bin", "/sbin", "/lib", "/lib64")
# Also refused exactly (their subfolders are fine): hiding them would break the sandbox's own tools.
FORBIDDEN_MOUNT_PATHS = ("/usr", "/var", "/run", "/tmp", "/opt", "/opt/tidepool", "/root", "/home")


def utc_now() -> datetime:
    return datetime.now(UTC)


def key_prefix(volume_id: str) -> str:
    return f"volumes/{volume_id}"


def check_mount_path(path: str) -> None:
    """400 with the rule broken, as Daytona's messages."""
    if not path.startswith("/"):
        raise bad_request(f"Invalid mount path {path!r}: it must be absolute (start with /)")
    if path in ("/", "//"):
        raise bad_request(f"Invalid mount path {path!r}: cannot mount to the root directory")
    if "/../" in path or "/./" in path or path.endswith("/..") or path.endswith("/."):
        raise bad_request(f"Invalid mount path {path!r}: it cannot contain . or .. segments")
    if "//" in path[1:]:
        raise bad_request(f"Invalid mount path {path!r}: it cannot contain consecutive slashes")
    normal = path.rstrip("/")
    for root in FORBIDDEN_MOUNT_ROOTS:
        if normal == root or normal.startswith(root + "/"):
            raise bad_request(f"Invalid mount path {path!r}: cannot mount to the system directory {root}")
    if normal in FORBIDDEN_MOUNT_PATHS:
        raise bad_request(f"Invalid mount path {path!r}: cannot mount over the system directory {normal}")


def check_subpath(subpath: str) -> str:
    """The subpath as a normalised relative key prefix ("" = the whole volume), or 400."""
    if subpath.startswith("/") or ".." in subpath or "//" in subpath:
        raise bad_request(f"Invalid subpath {subpath!r}: no leading /, no .., no //")
    normal = posixpath.normpath(subpath) if subpath else ""
    return "" if normal == "." else normal.strip("/")


def check_mounts(mounts: list[VolumeMount]) -> None:
    """The mount-path rules, and no two mounts on one path or one inside another."""
    paths: list[str] = []
    for mount in mounts:
        check_mount_path(mount.mount_path)
        check_subpath(mount.subpath or "")
        path = mount.mount_path.rstrip("/")
        for other in paths:
            if path == other:
                raise bad_request(f"Invalid mount path {mount.mount_path!r}: two volumes mounted on it")
            if path.startswith(other + "/") or other.startswith(path + "/"):
                raise bad_request(f"Invalid mount path {mount.mount_path!r}: nested in mount path {other!r}")
        paths.append(path)


async def find_volume(
    session: AsyncSession, organization_id: str, id_or_name: str, *, lock: bool = False
) -> Volume:
    """A volume not deleted, by id or name; 400 when the reference names two volumes, 404 when none.
    `lock`: the row stays locked until the session commits (PostgreSQL), see `resolve_mounts`."""
    statement = select(Volume).where(
        Volume.organization_id == organization_id,
        or_(Volume.id == id_or_name, Volume.name == id_or_name),
        Volume.state != DELETED,
    )
    if lock:
        statement = statement.with_for_update()
    rows = (await session.exec(statement)).all()
    if not rows:
        raise not_found(f"Volume {id_or_name} not found")
    if len(rows) > 1:
        raise bad_request(f"Volume reference {id_or_name} matches one volume's ID and another's name")
    return rows[0]


async def resolve_mounts(
    session: AsyncSession, organization_id: str, mounts: list[VolumeMount]
) -> list[dict[str, str]]:
    """What a new sandbox stores: each mount checked, its volume resolved to an id and `ready`. The volume
    rows stay locked until the sandbox row is committed, and `delete_volume` takes the same lock before it
    looks for users: a volume is never deleted under a sandbox being created with it."""
    check_mounts(mounts)
    resolved: list[dict[str, str]] = []
    for mount in mounts:
        volume = await find_volume(session, organization_id, mount.volume_id, lock=True)
        if volume.state != READY:
            raise bad_request(f"Volume {mount.volume_id} is not ready (state: {volume.state})")
        volume.last_used_at = utc_now()
        session.add(volume)
        resolved.append(
            {
                "volumeId": volume.id,
                "mountPath": mount.mount_path.rstrip("/"),
                "subpath": check_subpath(mount.subpath or ""),
            }
        )
    return resolved


def mount_specs(mounts: list[dict[str, str]]) -> list[VolumeMountSpec]:
    return [
        VolumeMountSpec(
            volume_id=mount["volumeId"],
            mount_path=mount["mountPath"],
            subpath=mount.get("subpath") or "",
            key_prefix=key_prefix(mount["volumeId"]),
        )
        for mount in mounts
    ]


# -- object storage ------------------------------------------------------------------------------------------


def storage_configured(settings: ApiSettings) -> bool:
    return bool(settings.s3_endpoint and settings.s3_secret_key)


def storage_client(settings: ApiSettings, organization_id: str) -> Minio:
    parts = urlsplit(settings.s3_endpoint)
    http_client = urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED",
        ca_certs=settings.s3_ca_file or None,
        timeout=urllib3.Timeout(connect=10, read=60),
        retries=urllib3.Retry(total=3, backoff_factor=0.3, status_forcelist=(500, 502, 503, 504)),
    )
    access_key, secret_key = service_key(settings.s3_secret_key, organization_id)
    return Minio(
        parts.netloc,
        access_key=access_key,
        secret_key=secret_key,
        secure=parts.scheme == "https",
        region=settings.s3_region,
        http_client=http_client,
    )


def create_storage(settings: ApiSettings, organization_id: str, volume_id: str) -> None:
    client = storage_client(settings, organization_id)
    client.put_object(settings.s3_bucket, f"{key_prefix(volume_id)}/{MARKER}", io.BytesIO(b""), 0)


def delete_storage(settings: ApiSettings, organization_id: str, volume_id: str) -> None:
    """Every object under the volume's prefix (the data is gone for good)."""
    client = storage_client(settings, organization_id)
    names = [
        DeleteObject(item.object_name)
        for item in client.list_objects(
            settings.s3_bucket, prefix=f"{key_prefix(volume_id)}/", recursive=True
        )
        if item.object_name
    ]
    for error in client.remove_objects(settings.s3_bucket, names):
        raise RuntimeError(f"could not delete {error.name}: {error.message}")


# -- use cases -----------------------------------------------------------------------------------------------


def require_storage(settings: ApiSettings) -> None:
    if not storage_configured(settings):
        raise ApiError(
            503,
            "object storage is not configured (TIDEPOOL_S3_ENDPOINT, TIDEPOOL_S3_SECRET_KEY): "
            "volumes need it",
        )


async def create_volume(context: ApiContext, organization_id: str, name: str) -> Volume:
    settings = context.settings
    require_storage(settings)
    async with (
        context.database.sessions() as session,
        quotas.organization_lock(session, organization_id) as organization,
    ):
        await quotas.check_volume_count(session, settings, organization, DELETED)
        volume = Volume(id=str(uuid.uuid4()), organization_id=organization_id, name=name, state=CREATING)
        session.add(volume)
        webhooks.record_volume_created(session, volume)
        try:
            await session.commit()
        except IntegrityError:
            raise bad_request(f"Volume with name {name} already exists") from None
    try:
        await asyncio.to_thread(create_storage, settings, organization_id, volume.id)
    except Exception as error:
        log.error("volume.create_failed", volume_id=volume.id, error=str(error))
        return await _set_state(context, volume, ERROR, error_reason=f"object storage: {error}")
    return await _set_state(context, volume, READY)


async def _set_state(
    context: ApiContext, volume: Volume, state: str, error_reason: str | None = None
) -> Volume:
    async with context.database.sessions() as session:
        row = await session.get(Volume, volume.id)
        if row is None:
            raise not_found(f"Volume {volume.id} not found")
        old_state = row.state
        row.state = state
        row.error_reason = error_reason
        row.updated_at = utc_now()
        webhooks.record_volume_state(session, row, old_state, state)
        session.add(row)
        await session.commit()
        await session.refresh(row)
        return row


async def users_of(session: AsyncSession, organization_id: str, volume_id: str) -> list[str]:
    """Ids of the sandboxes not destroyed that mount the volume."""
    rows = (
        await session.exec(
            select(Sandbox.id, Sandbox.volumes).where(
                Sandbox.organization_id == organization_id,
                col(Sandbox.state) != SandboxState.DESTROYED.value,
            )
        )
    ).all()
    return [sandbox_id for sandbox_id, mounts in rows if any(m.get("volumeId") == volume_id for m in mounts)]


async def delete_volume(context: ApiContext, organization_id: str, volume_id: str) -> None:
    """Refused (409) while a sandbox that is not destroyed mounts it; otherwise its objects go, then the row
    is `deleted` and the name is free."""
    settings = context.settings
    require_storage(settings)
    async with context.database.sessions() as session:
        volume = await session.get(Volume, volume_id, with_for_update=True)
        if volume is None or volume.organization_id != organization_id or volume.state == DELETED:
            raise not_found(f"Volume {volume_id} not found")
        if volume.state not in (READY, ERROR):
            raise bad_request(f"Volume {volume_id} cannot be deleted in state {volume.state}")
        users = await users_of(session, organization_id, volume_id)
        if users:
            raise conflict(f"Volume {volume.name} is in use by sandbox(es) {', '.join(users)}")
        old_state = volume.state
        volume.state = PENDING_DELETE
        volume.updated_at = utc_now()
        webhooks.record_volume_state(session, volume, old_state, PENDING_DELETE)
        session.add(volume)
        await session.commit()
    await _set_state(context, volume, DELETING)
    try:
        await asyncio.to_thread(delete_storage, settings, organization_id, volume_id)
    except Exception as error:
        log.error("volume.delete_failed", volume_id=volume_id, error=str(error))
        await _set_state(context, volume, ERROR, error_reason=f"deleting its objects failed: {error}")
        raise ApiError(503, f"Volume {volume_id}: deleting its objects failed: {error}") from error
    await _set_state(context, volume, DELETED)
