"""Every subscriber and publisher of the API on the bus (the map: docs/asyncapi/asyncapi.yaml).

Subscribes: sandbox, snapshot, process and daemon events (applied to the database), registry-credential
requests (answered), its own webhook outbox (fanned out to endpoints' deliveries). Publishes: sandbox
intents, build jobs and the webhook outbox.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog

from tidepool_api.context import ApiContext
from tidepool_api.events import apply_sandbox_event, apply_snapshot_event
from tidepool_api.registries import credentials_for
from tidepool_api.sandbox_events import record_daemon_health, record_process_termination
from tidepool_api.webhook_delivery import fan_out
from tidepool_contracts import channels
from tidepool_contracts.models import (
    DaemonHealthEvent,
    ProcessTerminationEvent,
    RegistryCredentialsReply,
    RegistryCredentialsRequest,
    SandboxStateEvent,
    SnapshotEvent,
    WebhookEvent,
)
from tidepool_runtime.broker import Registrar, declare_publishers, jetstream_subscriber, reply_subscriber

log = structlog.get_logger("tidepool.api.subscribers")

PUBLISHES = (
    channels.SANDBOX_INTENTS,
    channels.BUILD_JOBS,
    channels.SANDBOX_METRICS_QUERY,
    channels.WEBHOOK_EVENTS,
)


def register(registrar: Registrar, context: ApiContext) -> dict[channels.Channel[Any], Any]:
    """Add the API's subscribers to `registrar`; return its publishers (for `Bus`)."""
    # Events of one sandbox are applied in arrival order even though the consumer runs several at once.
    locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @jetstream_subscriber(registrar, channels.SANDBOX_EVENTS, durable="api-sandbox-state", concurrency=8)
    async def on_sandbox_state(event: SandboxStateEvent) -> None:
        lock = locks[event.sandbox_id]
        async with lock:
            await apply_sandbox_event(context, event)
        if not lock.locked() and not lock._waiters:
            locks.pop(event.sandbox_id, None)

    @jetstream_subscriber(registrar, channels.SNAPSHOT_EVENTS, durable="api-snapshot-state")
    async def on_snapshot_state(event: SnapshotEvent) -> None:
        await apply_snapshot_event(context, event)

    @jetstream_subscriber(registrar, channels.PROCESS_EVENTS, durable="api-process-events")
    async def on_process_terminated(event: ProcessTerminationEvent) -> None:
        await record_process_termination(context, event)

    @jetstream_subscriber(registrar, channels.DAEMON_EVENTS, durable="api-daemon-events")
    async def on_daemon_health(event: DaemonHealthEvent) -> None:
        await record_daemon_health(context, event)

    # One at a time, in stream order: the deliveries of a resource are made in the order of its changes.
    @jetstream_subscriber(registrar, channels.WEBHOOK_EVENTS, durable="api-webhook-fanout")
    async def on_webhook_event(event: WebhookEvent) -> None:
        await fan_out(context, event)

    @reply_subscriber(registrar, channels.REGISTRY_CREDENTIALS, queue="api")
    async def on_registry_credentials(request: RegistryCredentialsRequest) -> RegistryCredentialsReply:
        try:
            return await credentials_for(context, request.organization_id, request.image)
        except Exception as error:
            log.warning("registry.credentials_failed", error=str(error))
            return RegistryCredentialsReply(found=False)

    return declare_publishers(registrar, *PUBLISHES, service="api")
