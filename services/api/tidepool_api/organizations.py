"""Organization use cases: the explicit admin role, and deleting an organization with everything it owns."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from sqlalchemy import delete
from sqlmodel import col, select

from tidepool_api import otel_config
from tidepool_api.auth import key_record
from tidepool_api.context import ApiContext
from tidepool_api.db import ApiKey, DockerRegistry, Organization, Sandbox, Snapshot
from tidepool_api.errors import ApiError, not_found
from tidepool_api.sandboxes import delete_sandbox
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import kv_put

log = structlog.get_logger("tidepool.api.organizations")


async def is_admin(context: ApiContext, organization_id: str) -> bool:
    """True for the operator's organization (`organization.is_admin`, set by the first start)."""
    async with context.database.sessions() as session:
        organization = await session.get(Organization, organization_id)
    return organization is not None and organization.is_admin and organization.deleted_at is None


async def require_admin(context: ApiContext, organization_id: str) -> None:
    """403 unless the caller's organization is the admin organization."""
    if not await is_admin(context, organization_id):
        raise ApiError(403, "only the admin organization can manage organizations")


async def publish_key(context: ApiContext, api_key: ApiKey) -> None:
    """Mirror a key's state to KV: the proxy authenticates from there, never from the database."""
    await kv_put(context.api_keys_kv, api_key.key_hash, key_record(api_key))


async def delete_organization(context: ApiContext, organization_id: str, deleted_by: str) -> dict[str, int]:
    """Delete a tenant organization; returns what was removed, e.g. `{"sandboxes": 2, "apiKeys": 1, ...}`.

    Order matters: the organization is marked deleted and its keys revoked first (no new request of the
    tenant gets through, in the API nor in the proxy), then its sandboxes are deleted through the normal
    intent path (the runners remove the containers, asynchronously), then its snapshots and registries.
    The organization row stays, with `deleted_at`, as the record of the deletion. Idempotent for a retry
    after a failure half-way; 404 once it is done, or for an unknown id; 403 for the admin organization.
    """
    async with context.database.sessions() as session:
        organization = await session.get(Organization, organization_id)
        if organization is None:
            raise not_found(f"Organization {organization_id} not found")
        if organization.is_admin:
            raise ApiError(403, "the admin organization cannot be deleted")
        keys = (await session.exec(select(ApiKey).where(ApiKey.organization_id == organization_id))).all()
        sandbox_ids = (
            await session.exec(
                select(Sandbox.id).where(
                    Sandbox.organization_id == organization_id,
                    col(Sandbox.state).not_in([SandboxState.DESTROYED.value, SandboxState.DESTROYING.value]),
                )
            )
        ).all()
        if organization.deleted_at is not None and not sandbox_ids and all(key.revoked for key in keys):
            raise not_found(f"Organization {organization_id} not found")
        organization.deleted_at = organization.deleted_at or datetime.now(UTC)
        session.add(organization)
        for api_key in keys:
            api_key.revoked = True
            session.add(api_key)
        await session.commit()
    for api_key in keys:
        context.authenticator.forget(api_key.key_hash)
        await publish_key(context, api_key)
    await otel_config.publish(context, organization)  # its metrics stop being exported
    sandboxes_deleted = 0
    for sandbox_id in sandbox_ids:
        try:
            await delete_sandbox(context, organization_id, sandbox_id, with_forks_alive=True)
            sandboxes_deleted += 1
        except ApiError as error:  # gone meanwhile, or changing state: retried by a second DELETE
            log.warning("organization.sandbox_delete_failed", sandbox_id=sandbox_id, error=error.message)
    async with context.database.sessions() as session:
        snapshots = await session.exec(  # type: ignore[call-overload]
            delete(Snapshot).where(col(Snapshot.organization_id) == organization_id)
        )
        registries = await session.exec(  # type: ignore[call-overload]
            delete(DockerRegistry).where(col(DockerRegistry.organization_id) == organization_id)
        )
        await session.commit()
    removed = {
        "sandboxes": sandboxes_deleted,
        "snapshots": snapshots.rowcount or 0,
        "registries": registries.rowcount or 0,
        "apiKeys": len(keys),
    }
    # The audit record: who deleted which organization, and what went with it (the row keeps deleted_at).
    log.info(
        "organization.deleted",
        organization_id=organization_id,
        organization_name=organization.name,
        deleted_by=deleted_by,
        **removed,
    )
    return removed
