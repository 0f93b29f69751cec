"""Every subscriber of the telemetry service on the bus (the map: docs/asyncapi/asyncapi.yaml).

Subscribes: sandbox events, replayed from the start of the stream on every start (counts need no storage).
Publishes nothing.
"""

from __future__ import annotations

from tidepool_contracts import channels
from tidepool_contracts.models import SandboxStateEvent
from tidepool_runtime.broker import Registrar, replay_subscriber
from tidepool_telemetry.counts import SandboxCounts


def register(registrar: Registrar, counts: SandboxCounts) -> None:
    @replay_subscriber(registrar, channels.SANDBOX_EVENTS, service="telemetry")
    async def on_sandbox_state(event: SandboxStateEvent) -> None:
        counts.apply(event)
