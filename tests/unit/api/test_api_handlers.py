"""The API's bus handlers in FastStream's in-memory TestNatsBroker (no server): wiring, replies, poison."""

from __future__ import annotations

from typing import Any

import pytest
from faststream.nats import TestNatsBroker

from tidepool_api import subscribers
from tidepool_contracts import channels
from tidepool_contracts.models import (
    DaemonHealthEvent,
    DaemonHealthOutcome,
    ProcessTerminationEvent,
    RegistryCredentialsReply,
    RegistryCredentialsRequest,
    SandboxStateEvent,
)
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import Bus, create_broker, declare_publishers

CONTEXT: Any = object()


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """What the handlers hand to the domain modules (the database side is tested in test_api_service.py)."""
    calls: list[tuple[str, Any]] = []

    def recorder(name: str) -> Any:
        async def record(context: Any, *args: Any) -> Any:
            assert context is CONTEXT
            calls.append((name, args))
            if name == "credentials_for":
                organization_id, image = args
                if organization_id == "broken":
                    raise RuntimeError("database away")
                return RegistryCredentialsReply(found=True, username=organization_id, server_address=image)
            return None

        return record

    for name in (
        "apply_sandbox_event",
        "apply_snapshot_event",
        "record_process_termination",
        "record_daemon_health",
        "credentials_for",
    ):
        monkeypatch.setattr(subscribers, name, recorder(name))
    return calls


def started(sandbox_id: str) -> SandboxStateEvent:
    return SandboxStateEvent(
        sandbox_id=sandbox_id, organization_id="o", state=SandboxState.STARTED, source="runner"
    )


async def test_events_reach_their_handlers(applied: list[tuple[str, Any]]) -> None:
    broker = create_broker("nats://unused:4222", "test")
    subscribers.register(broker, CONTEXT)
    runner = Bus(
        broker,
        declare_publishers(
            broker, channels.SANDBOX_EVENTS, channels.PROCESS_EVENTS, channels.DAEMON_EVENTS, service="runner"
        ),
    )
    async with TestNatsBroker(broker):
        await runner.publish(channels.SANDBOX_EVENTS, started("s1"), sandbox_id="s1")
        termination = ProcessTerminationEvent(
            sandbox_id="s1",
            organization_id="o",
            daemon_boot_id="boot",
            sequence=1,
            kind="exec",
            command="sleep",
            reason="timeout",
            ended_at=started("s1").occurred_at,
        )
        await runner.publish(channels.PROCESS_EVENTS, termination, sandbox_id="s1")
        health = DaemonHealthEvent(
            sandbox_id="s1", organization_id="o", outcome=DaemonHealthOutcome.RESTARTED, reason="silent"
        )
        await runner.publish(channels.DAEMON_EVENTS, health, sandbox_id="s1")
    assert [name for name, _ in applied] == [
        "apply_sandbox_event",
        "record_process_termination",
        "record_daemon_health",
    ]
    assert applied[0][1][0].sandbox_id == "s1" and applied[0][1][0].state == SandboxState.STARTED


async def test_registry_credentials_are_answered_and_failures_answer_not_found(
    applied: list[tuple[str, Any]],
) -> None:
    broker = create_broker("nats://unused:4222", "test")
    subscribers.register(broker, CONTEXT)
    builder = Bus(broker)
    async with TestNatsBroker(broker):
        request = RegistryCredentialsRequest(organization_id="org-1", image="ghcr.io/org/app:1")
        reply = await builder.request(channels.REGISTRY_CREDENTIALS, request, timeout=1)
        assert reply == RegistryCredentialsReply(
            found=True, username="org-1", server_address="ghcr.io/org/app:1"
        )
        broken = RegistryCredentialsRequest(organization_id="broken", image="ghcr.io/org/app:1")
        assert await builder.request(
            channels.REGISTRY_CREDENTIALS, broken, timeout=1
        ) == RegistryCredentialsReply(found=False)


async def test_a_message_that_is_not_its_channels_model_never_reaches_the_domain(
    applied: list[tuple[str, Any]],
) -> None:
    broker = create_broker("nats://unused:4222", "test")
    subscribers.register(broker, CONTEXT)
    async with TestNatsBroker(broker) as test_broker:
        with pytest.raises(Exception):  # noqa: B017 (pydantic's ValidationError, re-raised by the test broker)
            await test_broker.publish({"sandbox_id": "s1"}, "tidepool.event.sandbox.s1")
    assert applied == []
