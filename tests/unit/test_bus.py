"""The broker against a real nats-server: typed channels, trace propagation, redelivery, poison messages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from faststream.nats.annotations import NatsMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tests.polling import wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.models import BuildLogLine, SandboxStateEvent
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import Bus, connect, create_broker, jetstream_subscriber

trace.set_tracer_provider(TracerProvider())


def event(sandbox_id: str) -> SandboxStateEvent:
    return SandboxStateEvent(
        sandbox_id=sandbox_id, organization_id="o", state=SandboxState.STARTED, source="t"
    )


async def consumer(
    nats_url: str, durable: str, sandbox_id: str, handler: Callable[[SandboxStateEvent, Any], Awaitable[None]]
) -> Bus:
    """A started bus whose one subscriber (ack wait 2 s) hands each event and NATS message to `handler`."""
    bus = Bus(create_broker(nats_url, f"test-{durable}"))

    @jetstream_subscriber(
        bus.broker,
        channels.SANDBOX_EVENTS,
        durable=durable,
        subject=channels.SANDBOX_EVENTS.address(sandbox_id=sandbox_id),
        ack_wait=2,
    )
    async def on_event(model: SandboxStateEvent, msg: NatsMessage) -> None:
        await handler(model, msg.raw_message)

    await bus.connect()
    await bus.start()
    return bus


async def test_trace_context_travels_in_headers(nats_url: str) -> None:
    publisher = await connect(nats_url, "test-trace-publisher", publishes=(channels.SANDBOX_EVENTS,))
    received: asyncio.Future[tuple[SandboxStateEvent, int]] = asyncio.get_running_loop().create_future()

    async def handler(model: SandboxStateEvent, _msg: Any) -> None:
        received.set_result((model, trace.get_current_span().get_span_context().trace_id))

    bus = await consumer(nats_url, "trace-test", "trace", handler)
    with trace.get_tracer("test").start_as_current_span("publisher") as span:
        await publisher.publish(channels.SANDBOX_EVENTS, event("trace"), sandbox_id="trace")
        expected = span.get_span_context().trace_id
    model, trace_id = await asyncio.wait_for(received, 10)
    assert model.sandbox_id == "trace"
    assert trace_id == expected
    await bus.close()
    await publisher.close()


async def test_failed_handler_gets_the_message_again(nats_url: str) -> None:
    publisher = await connect(nats_url, "test-redelivery-publisher", publishes=(channels.SANDBOX_EVENTS,))
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(_model: SandboxStateEvent, msg: Any) -> None:
        attempts.append(msg.metadata.num_delivered)
        if len(attempts) < 2:
            raise RuntimeError("transient")
        done.set()

    bus = await consumer(nats_url, "redelivery-test", "redeliver", handler)
    await publisher.publish(channels.SANDBOX_EVENTS, event("redeliver"), sandbox_id="redeliver")
    await asyncio.wait_for(done.wait(), 15)
    assert attempts == [1, 2]
    await bus.close()
    await publisher.close()


async def test_undecodable_message_is_terminated_not_redelivered(nats_url: str) -> None:
    """A poison message is terminated at once; the next good message is still handled."""
    publisher = await connect(nats_url, "test-poison-publisher", publishes=(channels.SANDBOX_EVENTS,))
    seen: list[str] = []
    good = asyncio.Event()

    async def handler(model: SandboxStateEvent, _msg: Any) -> None:
        seen.append(model.sandbox_id)
        good.set()

    bus = await consumer(nats_url, "poison-test", "poison", handler)
    js = publisher.jetstream
    await js.publish(channels.SANDBOX_EVENTS.address(sandbox_id="poison"), b'{"not": "an event"}')
    await publisher.publish(channels.SANDBOX_EVENTS, event("poison"), sandbox_id="poison")
    await asyncio.wait_for(good.wait(), 15)

    async def settled() -> Any:
        # The good message's ack reaches the server just after its handler returns.
        info = await js.consumer_info(channels.EVENTS.name, "poison-test")
        return info if info.num_ack_pending == 0 else None

    info = await wait_until_async(settled, "a message stayed unacknowledged (was the poison one terminated?)")
    assert seen == ["poison"]
    assert info.num_redelivered == 0
    await bus.close()
    await publisher.close()


async def test_duplicate_publish_is_dropped(nats_url: str) -> None:
    bus = await connect(nats_url, "test-dedupe", publishes=(channels.SANDBOX_EVENTS,))
    await bus.publish(channels.SANDBOX_EVENTS, event("dedupe"), msg_id="same-id", sandbox_id="dedupe")
    await bus.publish(channels.SANDBOX_EVENTS, event("dedupe"), msg_id="same-id", sandbox_id="dedupe")
    js = bus.jetstream
    subject = channels.SANDBOX_EVENTS.address(sandbox_id="dedupe")
    subscription = await js.pull_subscribe(subject, durable="dedupe-probe", stream=channels.EVENTS.name)
    messages = await subscription.fetch(batch=10, timeout=2)
    assert len(messages) == 1
    await subscription.unsubscribe()
    await bus.close()


async def test_a_channel_refuses_another_model(nats_url: str) -> None:
    bus = await connect(nats_url, "test-typed", publishes=(channels.SANDBOX_EVENTS,))
    with pytest.raises(TypeError):
        await bus.publish(channels.SANDBOX_EVENTS, BuildLogLine(image_ref="x"), sandbox_id="typed")  # type: ignore[arg-type]
    with pytest.raises(KeyError):  # not declared by this bus
        await bus.publish(channels.BUILD_LOG_LINES, BuildLogLine(image_ref="x"), image="x")
    await bus.close()
