"""Webhooks (behaviour spec §17, README "Webhooks"): an organization's endpoints, and the changes recorded
for them in the transaction that made each change (the outbox).

- Events: Daytona's (`WebhookEventType`), with its flat payloads: `event`, `timestamp` and the event's
  fields in camelCase; states are the lowercase wire values.
- Recording: `record_*` add a `webhook_outbox` row to the caller's session, so a change and its message
  commit together or not at all; the commit wakes the relay (tidepool_api.webhook_delivery). Whether the
  organization has endpoints is not asked here (the hooks are synchronous, inside the write): the fan-out
  drops messages no endpoint subscribed to, as Daytona sends nothing to an organization without endpoints.
- Endpoints: `https://` URLs (`TIDEPOOL_WEBHOOK_ALLOW_INSECURE_URLS` also accepts `http://`) whose host
  resolves to public addresses only (or `TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS`; `check_url`), an optional
  event-type filter (empty: every type), enabled flag, description. The signing secret (`whsec_...`,
  Standard Webhooks) is returned at creation and rotation only and stored sealed by the SecretBox.
  Another organization's endpoint is 404.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import structlog
from sqlalchemy import delete, event
from sqlalchemy.orm import Session
from sqlmodel import col, select

from tidepool_api.context import ApiContext
from tidepool_api.db import (
    WARM_POOL_ORGANIZATION_ID,
    Sandbox,
    Snapshot,
    Volume,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookOutbox,
    utc_now,
)
from tidepool_api.errors import ApiError
from tidepool_api.schemas import iso
from tidepool_contracts.models import WebhookEventType
from tidepool_runtime import netguard

log = structlog.get_logger("tidepool.api.webhooks")

# Key of SQLAlchemy `Session.info`: the asyncio.Event that wakes the outbox relay once a commit recorded one.
SESSION_WAKE = "tidepool.webhooks.wake"
SESSION_RECORDED = "tidepool.webhooks.recorded"
SANDBOX_CLASS = "container"  # Tidepool's sandboxes are containers (Daytona's `sandboxClass`)


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _record(
    session: Any,
    event_type: WebhookEventType,
    organization_id: str | None,
    ordering_key: str,
    fields: dict[str, Any],
    occurred_at: datetime | None = None,
) -> None:
    if not organization_id or organization_id == WARM_POOL_ORGANIZATION_ID:
        return  # the platform's own resources (general snapshots, unclaimed warm-pool members)
    moment = occurred_at or utc_now()
    sync_session = getattr(session, "sync_session", session)
    sync_session.add(
        WebhookOutbox(
            id=f"msg_{uuid.uuid4().hex}",
            organization_id=organization_id,
            event_type=event_type.value,
            ordering_key=ordering_key,
            payload={"event": event_type.value, "timestamp": iso(moment), **fields},
            occurred_at=moment,
        )
    )
    sync_session.info[SESSION_RECORDED] = True


@event.listens_for(Session, "after_commit")
def _wake_relay(session: Session) -> None:
    if session.info.pop(SESSION_RECORDED, False):
        wake: asyncio.Event | None = session.info.get(SESSION_WAKE)
        if wake is not None:
            wake.set()


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(SESSION_RECORDED, None)


def record_sandbox_created(session: Any, sandbox: Sandbox) -> None:
    if sandbox.warm_pool_id and not sandbox.claimed:
        return  # an unclaimed warm-pool member belongs to no tenant yet
    _record(
        session,
        WebhookEventType.SANDBOX_CREATED,
        sandbox.organization_id,
        f"sandbox:{sandbox.id}",
        {
            "id": sandbox.id,
            "organizationId": sandbox.organization_id,
            "state": sandbox.state,
            "sandboxClass": SANDBOX_CLASS,
            "createdAt": iso(sandbox.created_at),
        },
    )


def record_sandbox_state(session: Any, sandbox: Sandbox, old_state: str, new_state: str) -> None:
    if old_state == new_state or (sandbox.warm_pool_id and not sandbox.claimed):
        return
    _record(
        session,
        WebhookEventType.SANDBOX_STATE_UPDATED,
        sandbox.organization_id,
        f"sandbox:{sandbox.id}",
        {
            "id": sandbox.id,
            "organizationId": sandbox.organization_id,
            "oldState": old_state,
            "newState": new_state,
            "updatedAt": iso(sandbox.updated_at),
        },
    )


def record_snapshot_created(session: Any, snapshot: Snapshot) -> None:
    if snapshot.general or snapshot.hidden:
        return  # the platform's, or the hidden build behind a declarative sandbox
    _record(
        session,
        WebhookEventType.SNAPSHOT_CREATED,
        snapshot.organization_id,
        f"snapshot:{snapshot.id}",
        {
            "id": snapshot.id,
            "name": snapshot.name,
            "organizationId": snapshot.organization_id,
            "state": snapshot.state,
            "createdAt": iso(snapshot.created_at),
        },
    )


def record_snapshot_state(session: Any, snapshot: Snapshot, old_state: str, new_state: str) -> None:
    if old_state == new_state or snapshot.general or snapshot.hidden:
        return
    _record(
        session,
        WebhookEventType.SNAPSHOT_STATE_UPDATED,
        snapshot.organization_id,
        f"snapshot:{snapshot.id}",
        {
            "id": snapshot.id,
            "name": snapshot.name,
            "organizationId": snapshot.organization_id,
            "oldState": old_state,
            "newState": new_state,
            "updatedAt": iso(snapshot.updated_at),
        },
    )


def record_snapshot_removed(session: Any, snapshot: Snapshot) -> None:
    if snapshot.general or snapshot.hidden:
        return
    now = utc_now()
    _record(
        session,
        WebhookEventType.SNAPSHOT_REMOVED,
        snapshot.organization_id,
        f"snapshot:{snapshot.id}",
        {
            "id": snapshot.id,
            "name": snapshot.name,
            "organizationId": snapshot.organization_id,
            "removedAt": iso(now),
        },
        now,
    )


def record_volume_created(session: Any, volume: Volume) -> None:
    _record(
        session,
        WebhookEventType.VOLUME_CREATED,
        volume.organization_id,
        f"volume:{volume.id}",
        {
            "id": volume.id,
            "name": volume.name,
            "organizationId": volume.organization_id,
            "state": volume.state,
            "createdAt": iso(volume.created_at),
        },
    )


def record_volume_state(session: Any, volume: Volume, old_state: str, new_state: str) -> None:
    if old_state == new_state:
        return
    _record(
        session,
        WebhookEventType.VOLUME_STATE_UPDATED,
        volume.organization_id,
        f"volume:{volume.id}",
        {
            "id": volume.id,
            "name": volume.name,
            "organizationId": volume.organization_id,
            "oldState": old_state,
            "newState": new_state,
            "updatedAt": iso(volume.updated_at),
        },
    )


# Endpoints.


async def check_url(context: ApiContext, url: str) -> str:
    """`url`, if the deliverer may POST to it: an allowed scheme, a host, and every address the host
    resolves to public or in `TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS` (tidepool_runtime.netguard). A name
    that does not resolve now is accepted: the deliverer checks the address of every connection it makes.
    Raises ApiError 400 saying which rule it breaks."""
    parts = urlsplit(url)
    allowed = ("https", "http") if context.settings.webhook_allow_insecure_urls else ("https",)
    try:
        port = parts.port
    except ValueError:
        raise ApiError(400, "Webhook endpoint URL has a port that is not a number from 1 to 65535") from None
    if parts.scheme not in allowed or not parts.hostname:
        raise ApiError(400, f"Webhook endpoint URL must be an {' or '.join(allowed)} URL with a host")
    host = parts.hostname
    try:
        await netguard.check_host(host, port, context.settings.tenant_endpoint_allowed_networks)
    except netguard.BlockedAddressError as refused:
        raise ApiError(
            400,
            f"Webhook endpoint URL must reach a public address: {refused}; an operator can allow a network "
            "with TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS",
        ) from None
    except OSError:
        # Not judged now (DNS down, a name made later): the deliverer judges every connection it makes.
        log.info("webhooks.url_unresolved", host=host)
    return url


def check_event_types(event_types: list[str]) -> list[str]:
    known = [member.value for member in WebhookEventType]
    unknown = [name for name in event_types if name not in known]
    if unknown:
        raise ApiError(400, f"Unknown webhook event types: {', '.join(unknown)}; known: {', '.join(known)}")
    return [name for name in known if name in event_types]


def _seal(context: ApiContext, secret: str) -> str:
    assert context.secret_box is not None
    return context.secret_box.seal(secret)


def open_secret(context: ApiContext, endpoint: WebhookEndpoint) -> str:
    assert context.secret_box is not None
    return context.secret_box.open(endpoint.secret_sealed)


async def create_endpoint(
    context: ApiContext,
    organization_id: str,
    url: str,
    event_types: list[str],
    enabled: bool,
    description: str,
) -> tuple[WebhookEndpoint, str]:
    """The endpoint and its secret (the only time it is returned in clear)."""
    secret = new_secret()
    endpoint = WebhookEndpoint(
        id=str(uuid.uuid4()),
        organization_id=organization_id,
        url=await check_url(context, url),
        description=description,
        event_types=check_event_types(event_types),
        enabled=enabled,
        secret_sealed=_seal(context, secret),
    )
    async with context.database.sessions() as session:
        session.add(endpoint)
        await session.commit()
        await session.refresh(endpoint)
    return endpoint, secret


async def list_endpoints(context: ApiContext, organization_id: str) -> list[WebhookEndpoint]:
    async with context.database.sessions() as session:
        rows = await session.exec(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.organization_id == organization_id)
            .order_by(col(WebhookEndpoint.created_at))
        )
        return list(rows.all())


async def _owned(session: Any, organization_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.organization_id != organization_id:
        raise ApiError(404, f"Webhook endpoint {endpoint_id} not found")
    return endpoint


async def get_endpoint(context: ApiContext, organization_id: str, endpoint_id: str) -> WebhookEndpoint:
    async with context.database.sessions() as session:
        return await _owned(session, organization_id, endpoint_id)


async def update_endpoint(
    context: ApiContext, organization_id: str, endpoint_id: str, changes: dict[str, Any]
) -> WebhookEndpoint:
    async with context.database.sessions() as session:
        endpoint = await _owned(session, organization_id, endpoint_id)
        if changes.get("url") is not None:
            endpoint.url = await check_url(context, changes["url"])
        if changes.get("event_types") is not None:
            endpoint.event_types = check_event_types(changes["event_types"])
        if changes.get("enabled") is not None:
            endpoint.enabled = changes["enabled"]
        if changes.get("description") is not None:
            endpoint.description = changes["description"]
        endpoint.updated_at = utc_now()
        session.add(endpoint)
        await session.commit()
        await session.refresh(endpoint)
        return endpoint


async def rotate_secret(context: ApiContext, organization_id: str, endpoint_id: str) -> str:
    """A new secret, used for every attempt from now on (the old one stops verifying)."""
    secret = new_secret()
    async with context.database.sessions() as session:
        endpoint = await _owned(session, organization_id, endpoint_id)
        endpoint.secret_sealed = _seal(context, secret)
        endpoint.updated_at = utc_now()
        session.add(endpoint)
        await session.commit()
    return secret


async def delete_endpoint(context: ApiContext, organization_id: str, endpoint_id: str) -> None:
    """The endpoint, its pending deliveries and its delivery log."""
    async with context.database.sessions() as session:
        endpoint = await _owned(session, organization_id, endpoint_id)
        await session.exec(delete(WebhookDelivery).where(col(WebhookDelivery.endpoint_id) == endpoint.id))  # type: ignore[call-overload]
        await session.exec(delete(WebhookAttempt).where(col(WebhookAttempt.endpoint_id) == endpoint.id))  # type: ignore[call-overload]
        await session.delete(endpoint)
        await session.commit()


async def list_attempts(
    context: ApiContext, organization_id: str, endpoint_id: str, limit: int
) -> list[WebhookAttempt]:
    """The endpoint's delivery log, newest first."""
    async with context.database.sessions() as session:
        endpoint = await _owned(session, organization_id, endpoint_id)
        rows = await session.exec(
            select(WebhookAttempt)
            .where(WebhookAttempt.endpoint_id == endpoint.id)
            .order_by(col(WebhookAttempt.attempted_at).desc())
            .limit(limit)
        )
        return list(rows.all())


async def list_deliveries(
    context: ApiContext, organization_id: str, endpoint_id: str, limit: int
) -> list[WebhookDelivery]:
    """The endpoint's messages and where each stands (pending / delivered / failed), newest first."""
    async with context.database.sessions() as session:
        endpoint = await _owned(session, organization_id, endpoint_id)
        rows = await session.exec(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint.id)
            .order_by(col(WebhookDelivery.sequence).desc())
            .limit(limit)
        )
        return list(rows.all())
