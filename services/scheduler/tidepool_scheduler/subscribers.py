"""Every subscriber and publisher of the scheduler on the bus (the map: docs/asyncapi/asyncapi.yaml).

Subscribes: sandbox intents. Publishes: runner jobs, and sandbox events for what it decides itself (a sandbox
never placed is destroyed or stopped at once; no runner means `error`).
"""

from __future__ import annotations

from typing import Any

from faststream.nats.annotations import NatsMessage

from tidepool_contracts import channels
from tidepool_contracts.models import SandboxIntent
from tidepool_runtime.broker import Registrar, declare_publishers, jetstream_subscriber
from tidepool_scheduler.scheduler import MAX_DELIVERIES_WITHOUT_RUNNER, Scheduler

PUBLISHES = (channels.RUNNER_JOBS, channels.SANDBOX_EVENTS)


def register(
    registrar: Registrar, scheduler: Scheduler, concurrency: int = 32
) -> dict[channels.Channel[Any], Any]:
    """Add the scheduler's subscribers to `registrar`, handling up to `concurrency` intents at once (setting
    `scheduler_intent_concurrency`); return its publishers (for `Bus`)."""

    @jetstream_subscriber(
        registrar,
        channels.SANDBOX_INTENTS,
        durable="scheduler-intents",
        ack_wait=10.0,
        max_deliver=MAX_DELIVERIES_WITHOUT_RUNNER + 2,
        concurrency=concurrency,
    )
    async def on_intent(intent: SandboxIntent, msg: NatsMessage) -> None:
        await scheduler.handle_intent(intent, msg.raw_message)

    return declare_publishers(registrar, *PUBLISHES, service="scheduler")
