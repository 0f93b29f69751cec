"""Webhook delivery (README "Webhooks"): outbox -> bus -> deliveries -> signed HTTP attempts.

1. Relay (`relay_outbox`): `webhook_outbox` rows, committed with the change they describe
   (tidepool_api.webhooks), are published in `seq` order on `WEBHOOK_EVENTS` (JetStream, with the message id
   as `Nats-Msg-Id`, so a relay that crashed after publishing and publishes again is a no-op) and then
   removed. Nothing is lost between the database commit and the bus.
2. Fan-out (`fan_out`, a durable consumer in subscribers.py): one `webhook_delivery` row per enabled
   endpoint of the organization that subscribed to the event type. Idempotent: (endpoint, message) is
   unique, so a redelivered bus message adds nothing.
3. Deliverer (`deliver_due`): signs with Standard Webhooks (`standardwebhooks`: `webhook-id`,
   `webhook-timestamp`, `webhook-signature`; the same values under Svix's `svix-*` names, as Daytona's
   Svix sends them) and POSTs the flat JSON payload. A 2xx delivers; anything else (status, refused
   connection, timeout) is retried after `base * 2^(attempts-1)` seconds, at most `max`, until the
   message is `give_up` seconds old; then it is `failed` (also when its endpoint is disabled, or its secret
   cannot be opened). Every attempt is logged (`webhook_attempt`) with the status code and a reason of
   ours, never the receiver's answer (a tenant must not read what an address answered). Connections go to
   public addresses only, or to `TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS` (tidepool_runtime.netguard, on the
   address actually connected to, so DNS rebinding after the URL was saved does not get around it).

Invariants: per endpoint, a resource's messages (`ordering_key`, e.g. `sandbox:<id>`) go in `sequence`
order and one at a time: a message is due only when no earlier one of its resource is still pending for
that endpoint. A claimed delivery is leased (its `next_attempt_at` moved past the attempt's time limit),
so another API replica does not send it at once again. Delivery is at least once: a crash between the
receiver's 2xx and the database update resends it, with the same `webhook-id` for the receiver to
deduplicate by.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from http import HTTPStatus

import aiohttp
import orjson
import structlog
from sqlalchemy import and_, delete, exists, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import col, select
from standardwebhooks import Webhook

from tidepool_api.context import ApiContext
from tidepool_api.db import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookOutbox, utc_now
from tidepool_api.webhooks import open_secret
from tidepool_contracts import channels
from tidepool_contracts.models import WebhookEvent, WebhookEventType
from tidepool_runtime import netguard

log = structlog.get_logger("tidepool.api.webhooks")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
RELAY_BATCH = 200
DELIVERY_BATCH = 50
USER_AGENT = "Tidepool-Webhooks/1"
SECRET_UNREADABLE = "The endpoint's signing secret cannot be opened (sealed with another key?): rotate it"


# 1. Relay.


async def relay_outbox(context: ApiContext) -> int:
    """Publish what the outbox holds, oldest first, and remove it; the number relayed."""
    relayed = 0
    while True:
        async with context.database.sessions() as session:
            rows = list(
                (
                    await session.exec(
                        select(WebhookOutbox).order_by(col(WebhookOutbox.seq)).limit(RELAY_BATCH)
                    )
                ).all()
            )
            if not rows:
                return relayed
            for row in rows:
                assert row.seq is not None
                event = WebhookEvent(
                    id=row.id,
                    organization_id=row.organization_id,
                    event_type=WebhookEventType(row.event_type),
                    ordering_key=row.ordering_key,
                    sequence=row.seq,
                    payload=row.payload,
                    occurred_at=row.occurred_at,
                )
                await context.bus.publish(
                    channels.WEBHOOK_EVENTS, event, msg_id=row.id, organization_id=row.organization_id
                )
            seqs = [row.seq for row in rows]
            await session.exec(delete(WebhookOutbox).where(col(WebhookOutbox.seq).in_(seqs)))  # type: ignore[call-overload]
            await session.commit()
            relayed += len(rows)


async def relay_forever(context: ApiContext) -> None:
    """Relay on every commit that recorded a change (woken), and every poll interval in case of a missed
    wake-up (another replica's commit, or a publish that failed and is retried)."""
    wake = context.webhook_outbox_wake
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=context.settings.webhook_poll_seconds)
        wake.clear()
        try:
            await relay_outbox(context)
        except Exception:
            log.warning("webhooks.relay_failed", exc_info=True)
            await asyncio.sleep(context.settings.webhook_poll_seconds)


# 2. Fan-out.


def subscribed(endpoint: WebhookEndpoint, event_type: str) -> bool:
    return endpoint.enabled and (not endpoint.event_types or event_type in endpoint.event_types)


async def fan_out(context: ApiContext, event: WebhookEvent) -> int:
    """One pending delivery per subscribed endpoint (none already made for this message); how many made."""
    made = 0
    async with context.database.sessions() as session:
        endpoints = (
            await session.exec(
                select(WebhookEndpoint).where(WebhookEndpoint.organization_id == event.organization_id)
            )
        ).all()
        targets = [endpoint for endpoint in endpoints if subscribed(endpoint, event.event_type.value)]
        if not targets:
            return 0  # Daytona: nothing is sent for an organization without endpoints
        existing = set(
            (
                await session.exec(
                    select(WebhookDelivery.endpoint_id).where(WebhookDelivery.message_id == event.id)
                )
            ).all()
        )
        for endpoint in targets:
            if endpoint.id in existing:
                continue
            session.add(
                WebhookDelivery(
                    id=str(uuid.uuid4()),
                    endpoint_id=endpoint.id,
                    organization_id=event.organization_id,
                    message_id=event.id,
                    event_type=event.event_type.value,
                    ordering_key=event.ordering_key,
                    sequence=event.sequence,
                    payload=event.payload,
                )
            )
            made += 1
        try:
            await session.commit()
        except IntegrityError:
            # Another replica fanned the same message out at the same moment: its rows stand.
            await session.rollback()
            return 0
    if made:
        context.webhook_delivery_wake.set()
    return made


# 3. Deliverer.


def aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def backoff_seconds(context: ApiContext, attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt: base * 2^(attempts-1), at most max."""
    settings = context.settings
    return float(
        min(settings.webhook_retry_max_seconds, settings.webhook_retry_base_seconds * 2 ** (attempts - 1))
    )


def signed_headers(secret: str, message_id: str, body: bytes, moment: datetime) -> dict[str, str]:
    """Standard Webhooks headers (and Svix's names for the same values, which Daytona's receivers read)."""
    signature = Webhook(secret).sign(message_id, moment, body.decode())
    timestamp = str(int(moment.timestamp()))
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": signature,
        "svix-id": message_id,
        "svix-timestamp": timestamp,
        "svix-signature": signature,
    }


async def _give_up_expired(context: ApiContext, now: datetime) -> int:
    """Pending deliveries `give_up` seconds old and not in flight become `failed`, attempted or not: those
    of a disabled endpoint (never claimed) and those queued behind an earlier one. How many."""
    cutoff = now - timedelta(seconds=context.settings.webhook_give_up_seconds)
    async with context.database.sessions() as session:
        result = await session.exec(
            update(WebhookDelivery)  # type: ignore[call-overload]
            .where(
                col(WebhookDelivery.status) == PENDING,
                col(WebhookDelivery.created_at) <= cutoff,
                col(WebhookDelivery.next_attempt_at) <= now,  # a leased one is settled by its attempt
            )
            .values(status=FAILED)
        )
        await session.commit()
    given_up = int(result.rowcount or 0)
    if given_up:
        log.warning("webhooks.given_up_unattempted", deliveries=given_up)
    return given_up


async def _claim(context: ApiContext) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
    """Due deliveries that head their resource's queue, leased for one attempt (expired ones given up
    first)."""
    now = utc_now()
    await _give_up_expired(context, now)
    earlier = aliased(WebhookDelivery)
    blocked = exists().where(
        and_(
            earlier.endpoint_id == WebhookDelivery.endpoint_id,
            earlier.ordering_key == WebhookDelivery.ordering_key,
            earlier.status == PENDING,
            earlier.sequence < WebhookDelivery.sequence,
        )
    )
    lease = timedelta(seconds=context.settings.webhook_timeout_seconds + 30.0)
    async with context.database.sessions() as session:
        rows = (
            await session.exec(
                select(WebhookDelivery, WebhookEndpoint)
                .join(WebhookEndpoint, col(WebhookEndpoint.id) == col(WebhookDelivery.endpoint_id))
                .where(
                    WebhookDelivery.status == PENDING,
                    col(WebhookDelivery.next_attempt_at) <= now,
                    col(WebhookEndpoint.enabled).is_(True),
                    ~blocked,
                )
                .order_by(col(WebhookDelivery.sequence))
                .limit(DELIVERY_BATCH)
                .with_for_update(of=WebhookDelivery, skip_locked=True)  # type: ignore[arg-type]
            )
        ).all()
        claimed = []
        for delivery, endpoint in rows:
            delivery.next_attempt_at = now + lease
            session.add(delivery)
            claimed.append((delivery, endpoint))
        await session.commit()
        session.expunge_all()  # used after the session (expire_on_commit is off); one endpoint may recur
    return claimed


async def _attempt(
    context: ApiContext, http: aiohttp.ClientSession, delivery: WebhookDelivery, endpoint: WebhookEndpoint
) -> tuple[int | None, str | None, int]:
    """One POST: (status code or None, error or None, duration in ms). The error is ours (`HTTP 503 Service
    Unavailable`, a refused connection or address, the secret): the receiver's body is never read."""
    body = orjson.dumps(delivery.payload)
    started = time.monotonic()
    try:
        headers = signed_headers(open_secret(context, endpoint), delivery.message_id, body, utc_now())
    except ValueError:  # sealed with another key, or not a secret: a failed attempt (a rotation fixes it)
        log.warning("webhooks.secret_unreadable", endpoint_id=endpoint.id)
        return None, SECRET_UNREADABLE, 0
    try:
        async with http.post(
            endpoint.url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=context.settings.webhook_timeout_seconds),
        ) as response:
            error = None if 200 <= response.status < 300 else http_error(response.status)
            return response.status, error, int((time.monotonic() - started) * 1000)
    except (aiohttp.ClientError, TimeoutError, OSError) as failure:
        return None, connection_error(failure), int((time.monotonic() - started) * 1000)


def http_error(status: int) -> str:
    """`HTTP 503 Service Unavailable`: the code and the standard phrase (not the receiver's)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "non-2xx status"
    if 300 <= status < 400:
        phrase += " (redirects are not followed)"
    return f"HTTP {status} {phrase}"


def connection_error(failure: BaseException) -> str:
    """Why no answer came; a refused address names the rule (and the operator's setting)."""
    cause = getattr(failure, "os_error", None)
    if isinstance(cause, netguard.BlockedAddressError) or "refused to connect:" in str(failure):
        blocked = cause if isinstance(cause, netguard.BlockedAddressError) else failure
        return f"Blocked: {blocked} (only public addresses, or TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS)"
    return f"{type(failure).__name__}: {failure}".strip()


async def _settle(
    context: ApiContext,
    delivery: WebhookDelivery,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
) -> None:
    now = utc_now()
    attempts = delivery.attempts + 1
    async with context.database.sessions() as session:
        row = await session.get(WebhookDelivery, delivery.id)
        if row is None:
            return  # its endpoint was deleted meanwhile
        row.attempts = attempts
        if error is None:
            row.status = DELIVERED
        elif (now - aware(row.created_at)).total_seconds() >= context.settings.webhook_give_up_seconds:
            row.status = FAILED
            log.warning(
                "webhooks.given_up", delivery_id=row.id, endpoint_id=row.endpoint_id, attempts=attempts
            )
        else:
            row.next_attempt_at = now + timedelta(seconds=backoff_seconds(context, attempts))
        session.add(row)
        session.add(
            WebhookAttempt(
                id=str(uuid.uuid4()),
                delivery_id=row.id,
                endpoint_id=row.endpoint_id,
                organization_id=row.organization_id,
                message_id=row.message_id,
                event_type=row.event_type,
                attempt=attempts,
                status_code=status_code,
                error=error,
                duration_ms=duration_ms,
                attempted_at=now,
            )
        )
        await session.commit()


async def deliver_due(context: ApiContext, http: aiohttp.ClientSession) -> int:
    """Attempt every due delivery once (different resources at once); how many were attempted."""
    claimed = await _claim(context)

    async def one(delivery: WebhookDelivery, endpoint: WebhookEndpoint) -> None:
        status_code, error, duration_ms = await _attempt(context, http, delivery, endpoint)
        await _settle(context, delivery, status_code, error, duration_ms)
        if error is None:
            context.webhook_delivery_wake.set()  # the next one of its resource is due now

    await asyncio.gather(*(one(delivery, endpoint) for delivery, endpoint in claimed))
    return len(claimed)


def guarded_session(context: ApiContext) -> aiohttp.ClientSession:
    """The deliverer's HTTP client: every connection checked on the address it goes to (netguard)."""
    factory = netguard.guarded_socket_factory(context.settings.tenant_endpoint_allowed_networks)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=factory))


async def deliver_forever(context: ApiContext) -> None:
    wake = context.webhook_delivery_wake
    async with guarded_session(context) as http:
        while True:
            try:
                attempted = await deliver_due(context, http)
            except Exception:
                log.warning("webhooks.deliver_failed", exc_info=True)
                attempted = 0
            if attempted:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=context.settings.webhook_poll_seconds)
            wake.clear()
