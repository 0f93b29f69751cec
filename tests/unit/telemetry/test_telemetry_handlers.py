"""The telemetry subscriber in FastStream's in-memory TestNatsBroker (no server): events become counts."""

from __future__ import annotations

from faststream.nats import TestNatsBroker

from tidepool_contracts import channels
from tidepool_contracts.models import SandboxStateEvent
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import Bus, create_broker, declare_publishers
from tidepool_telemetry import subscribers
from tidepool_telemetry.counts import SandboxCounts


async def test_sandbox_events_update_the_counts() -> None:
    broker = create_broker("nats://unused:4222", "test")
    counts = SandboxCounts()
    subscribers.register(broker, counts, Bus(broker))
    runner = Bus(broker, declare_publishers(broker, channels.SANDBOX_EVENTS, service="runner"))
    async with TestNatsBroker(broker):
        for sandbox_id, state in (
            ("a", SandboxState.STARTED),
            ("b", SandboxState.STARTED),
            ("a", SandboxState.STOPPED),
        ):
            event = SandboxStateEvent(
                sandbox_id=sandbox_id, organization_id="o", state=state, source="runner"
            )
            await runner.publish(channels.SANDBOX_EVENTS, event, sandbox_id=sandbox_id)
    assert dict(counts.by_organization_and_state()) == {("o", "started"): 1, ("o", "stopped"): 1}
