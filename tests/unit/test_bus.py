"""The bus helpers against a real nats-server: typed messages, trace propagation, redelivery."""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tidepool_contracts import subjects
from tidepool_contracts.models import SandboxStateEvent
from tidepool_contracts.states import SandboxState
from tidepool_runtime.bus import connect, consume, publish

trace.set_tracer_provider(TracerProvider())


def event(sandbox_id: str) -> SandboxStateEvent:
    return SandboxStateEvent(
        sandbox_id=sandbox_id, organization_id="o", state=SandboxState.STARTED, source="t"
    )


async def run_consumer(bus, durable: str, subject: str, handler) -> asyncio.Task[None]:  # type: ignore[no-untyped-def]
    return asyncio.create_task(
        consume(
            bus,
            stream=subjects.EVENTS_STREAM,
            durable=durable,
            subject=subject,
            model_type=SandboxStateEvent,
            handler=handler,
            ack_wait=2,
        )
    )


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_trace_context_travels_in_headers(nats_url: str) -> None:
    bus = await connect(nats_url, "test-trace")
    received: asyncio.Future[tuple[SandboxStateEvent, int]] = asyncio.get_running_loop().create_future()

    async def handler(model: SandboxStateEvent, _msg: Msg) -> None:
        received.set_result((model, trace.get_current_span().get_span_context().trace_id))

    task = await run_consumer(bus, "trace-test", subjects.event_sandbox("trace"), handler)
    with trace.get_tracer("test").start_as_current_span("publisher") as span:
        await publish(bus, subjects.event_sandbox("trace"), event("trace"))
        expected = span.get_span_context().trace_id
    model, trace_id = await asyncio.wait_for(received, 10)
    assert model.sandbox_id == "trace"
    assert trace_id == expected
    await stop(task)
    await bus.close()


async def test_failed_handler_gets_the_message_again(nats_url: str) -> None:
    bus = await connect(nats_url, "test-redelivery")
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(_model: SandboxStateEvent, msg: Msg) -> None:
        attempts.append(msg.metadata.num_delivered)
        if len(attempts) < 2:
            raise RuntimeError("transient")
        done.set()

    task = await run_consumer(bus, "redelivery-test", subjects.event_sandbox("redeliver"), handler)
    await publish(bus, subjects.event_sandbox("redeliver"), event("redeliver"))
    await asyncio.wait_for(done.wait(), 15)
    assert attempts == [1, 2]
    await stop(task)
    await bus.close()


async def test_duplicate_publish_is_dropped(nats_url: str) -> None:
    bus = await connect(nats_url, "test-dedupe")
    subject = subjects.event_sandbox("dedupe")
    await publish(bus, subject, event("dedupe"), msg_id="same-id")
    await publish(bus, subject, event("dedupe"), msg_id="same-id")
    subscription = await bus.js.pull_subscribe(subject, durable="dedupe-probe", stream=subjects.EVENTS_STREAM)
    messages = await subscription.fetch(batch=10, timeout=2)
    assert len(messages) == 1
    await subscription.unsubscribe()
    await bus.close()
