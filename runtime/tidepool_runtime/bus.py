"""Typed access to NATS: JetStream topology, publishing models with trace context, durable consumers, KV.

Every service talks to the bus through these functions so that message encoding, trace propagation,
acknowledgement and redelivery behave the same everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, KeyValueConfig, RetentionPolicy, StreamConfig
from nats.js.errors import BadRequestError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import propagate, trace
from pydantic import BaseModel, ValidationError

from tidepool_contracts import subjects

ModelT = TypeVar("ModelT", bound=BaseModel)
log = structlog.get_logger("tidepool.bus")
tracer = trace.get_tracer("tidepool.bus")

# KV buckets and the TTL of their entries (None = keep). Runner entries vanish when heartbeats stop.
KV_BUCKETS: dict[str, float | None] = {
    subjects.KV_RUNNERS: 30.0,
    subjects.KV_ROUTES: None,
    subjects.KV_PLACEMENTS: None,
    subjects.KV_DESIRED: None,
    subjects.KV_API_KEYS: None,
    subjects.KV_SIGNING_KEYS: None,
}

STREAMS: list[StreamConfig] = [
    StreamConfig(
        name=subjects.INTENTS_STREAM,
        subjects=[f"{subjects.INTENT_SANDBOX_PREFIX}.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=120.0,
    ),
    StreamConfig(
        name=subjects.JOBS_STREAM,
        subjects=[f"{subjects.JOB_RUNNER_PREFIX}.>", subjects.JOB_BUILD_SUBJECT],
        retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=120.0,
    ),
    StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[
            f"{subjects.EVENT_SANDBOX_PREFIX}.>",
            f"{subjects.EVENT_SNAPSHOT_PREFIX}.>",
            f"{subjects.EVENT_RUNNER_PREFIX}.>",
            f"{subjects.EVENT_PROCESS_PREFIX}.>",
            f"{subjects.EVENT_DAEMON_PREFIX}.>",
        ],
        retention=RetentionPolicy.LIMITS,
        max_age=7 * 24 * 3600.0,
        duplicate_window=120.0,
    ),
    StreamConfig(
        name=subjects.BUILD_LOGS_STREAM,
        subjects=[f"{subjects.BUILD_LOG_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        max_age=2 * 24 * 3600.0,
        max_msgs_per_subject=200_000,
    ),
]


@dataclass
class Bus:
    nc: NatsClient
    js: JetStreamContext

    async def kv(self, bucket: str) -> KeyValue:
        return await self.js.key_value(bucket)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()


async def connect(url: str, name: str) -> Bus:
    """Connect and make sure every stream and bucket exists (idempotent, so any service may start first)."""
    nc = await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
    )
    js = nc.jetstream()
    await ensure_topology(js)
    return Bus(nc=nc, js=js)


async def ensure_topology(js: JetStreamContext) -> None:
    for config in STREAMS:
        try:
            await js.add_stream(config=config)
        except BadRequestError:
            await js.update_stream(config=config)
    for bucket, ttl in KV_BUCKETS.items():
        try:
            await js.key_value(bucket)
        except (NotFoundError, BadRequestError):
            with contextlib.suppress(BadRequestError):
                await js.create_key_value(config=KeyValueConfig(bucket=bucket, history=1, ttl=ttl))


def encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


def decode(model_type: type[ModelT], data: bytes) -> ModelT:
    return model_type.model_validate(orjson.loads(data))


def trace_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    headers: dict[str, str] = dict(extra or {})
    propagate.inject(headers)
    return headers


async def publish(bus: Bus, subject: str, model: BaseModel, *, msg_id: str | None = None) -> None:
    """Publish durably to JetStream. `msg_id` makes a retried publish a no-op within the dedupe window."""
    headers = trace_headers({"Nats-Msg-Id": msg_id} if msg_id else None)
    await bus.js.publish(subject, encode(model), headers=headers)


async def kv_put(kv: KeyValue, key: str, model: BaseModel) -> int:
    return await kv.put(key, encode(model))


async def kv_get(kv: KeyValue, key: str, model_type: type[ModelT]) -> ModelT | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None
    return decode(model_type, entry.value)


async def kv_delete(kv: KeyValue, key: str) -> None:
    with contextlib.suppress(KeyNotFoundError):
        await kv.delete(key)


async def kv_items(kv: KeyValue, model_type: type[ModelT]) -> list[ModelT]:
    """All current values of a bucket (a snapshot; for reconciliation loops)."""
    try:
        keys = await kv.keys()
    except NotFoundError:
        return []
    except Exception as error:  # nats-py raises a generic NoKeysError subclass for an empty bucket
        if type(error).__name__ == "NoKeysError":
            return []
        raise
    items: list[ModelT] = []
    for key in keys:
        item = await kv_get(kv, key, model_type)
        if item is not None:
            items.append(item)
    return items


async def kv_watch(kv: KeyValue, model_type: type[ModelT]) -> AsyncIterator[tuple[str, ModelT | None]]:
    """Yield (key, value) for every current entry and then every change; value None means deleted."""
    watcher = await kv.watchall()
    try:
        async for entry in watcher:
            if entry is None:  # end of the initial snapshot
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                yield entry.key, None
                continue
            try:
                yield entry.key, decode(model_type, entry.value)
            except ValidationError:
                log.warning("kv.undecodable", bucket=kv._name, key=entry.key)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


Handler = Callable[[ModelT, Msg], Awaitable[None]]


class PermanentError(Exception):
    """A message that can never succeed: terminate it instead of redelivering."""


async def consume(
    bus: Bus,
    *,
    stream: str,
    durable: str,
    subject: str,
    model_type: type[ModelT],
    handler: Handler[ModelT],
    ack_wait: float = 30.0,
    max_deliver: int = 20,
    concurrency: int = 1,
    deliver_new_only: bool = False,
) -> None:
    """Run a durable pull consumer forever: ack on success, nak with backoff on failure, term if undecodable.

    A handler runs while the message is unacked, so a crash of this process means redelivery to the next
    instance after `ack_wait`: handlers must be idempotent. Long handlers should call `msg.in_progress()`.
    """
    config = ConsumerConfig(
        durable_name=durable,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.NEW if deliver_new_only else DeliverPolicy.ALL,
    )
    subscription = await bus.js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()

    async def process(msg: Msg) -> None:
        try:
            context = propagate.extract(dict(msg.headers or {}))
            with tracer.start_as_current_span(f"process {msg.subject}", context=context):
                try:
                    model = decode(model_type, msg.data)
                except (ValidationError, orjson.JSONDecodeError) as error:
                    log.error("bus.undecodable", subject=msg.subject, error=str(error))
                    await msg.term()
                    return
                try:
                    await handler(model, msg)
                except PermanentError as error:
                    log.error("bus.handler_failed_permanently", subject=msg.subject, error=str(error))
                    await msg.term()
                    return
                except Exception as error:
                    delivered = msg.metadata.num_delivered if msg.metadata else 1
                    log.exception(
                        "bus.handler_failed", subject=msg.subject, delivered=delivered, error=str(error)
                    )
                    await msg.nak(delay=min(30.0, 0.5 * 2 ** min(delivered, 6)))
                    return
                await msg.ack()
        finally:
            slots.release()

    try:
        while True:
            try:
                messages = await subscription.fetch(batch=concurrency, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:  # connection hiccups: keep consuming after reconnect
                log.warning("bus.fetch_failed", durable=durable, error=str(error))
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await slots.acquire()
                task = asyncio.create_task(process(msg))
                running.add(task)
                task.add_done_callback(running.discard)
    finally:
        # Without this a later drain of the connection waits for the pending pull request and times out.
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def keep_in_progress(msg: Msg, interval: float = 5.0) -> None:
    """Tell JetStream a long handler is alive so the message is not redelivered meanwhile."""
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            await msg.in_progress()
