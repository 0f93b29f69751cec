"""Every subscriber and publisher of the builder on the bus (the map: docs/asyncapi/asyncapi.yaml).

Subscribes: build jobs. Publishes: snapshot events and build log lines; asks the API for registry
credentials (request/reply).
"""

from __future__ import annotations

from typing import Any

from faststream.nats.annotations import NatsMessage

from tidepool_builder.builds import MAX_BUILD_DELIVERIES, Builder
from tidepool_contracts import channels
from tidepool_contracts.models import BuildJob
from tidepool_runtime.broker import Registrar, declare_publishers, jetstream_subscriber

PUBLISHES = (channels.SNAPSHOT_EVENTS, channels.BUILD_LOG_LINES, channels.REGISTRY_CREDENTIALS)


def register(registrar: Registrar, builder: Builder) -> dict[channels.Channel[Any], Any]:
    """Add the builder's subscribers to `registrar`; return its publishers (for `Bus`)."""

    @jetstream_subscriber(
        registrar,
        channels.BUILD_JOBS,
        durable="builder",
        ack_wait=30.0,
        max_deliver=MAX_BUILD_DELIVERIES + 1,
        concurrency=2,
    )
    async def on_build_job(job: BuildJob, msg: NatsMessage) -> None:
        await builder.handle(job, msg.raw_message)

    return declare_publishers(registrar, *PUBLISHES, service="builder")
