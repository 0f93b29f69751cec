"""The bus: FastStream's NatsBroker, set up the same way in every service from the channel table.

- Topology: every stream and KV bucket of `tidepool_contracts.channels` is declared at connect (idempotent, so
  any service may start first).
- Subscribers: `jetstream_subscriber` makes a durable JetStream pull consumer with explicit ack; a handler
  that raises is nak'ed with a growing delay (redelivered), a message that can never succeed (undecodable,
  or the handler raises `PermanentError`) is terminated. Handlers therefore must be idempotent.
- Publishers: `declare_publishers` registers a FastStream publisher per channel (they appear in the AsyncAPI
  document); `Bus.publish` refuses a model that is not the channel's.
- Trace context rides in message headers through FastStream's `NatsTelemetryMiddleware`; a structlog
  middleware binds service, subject and sandbox id for everything a handler logs.

nats-py is used directly only here, and only where FastStream has no equivalent (each place says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
from faststream import BaseMiddleware
from faststream.exceptions import HandlerException, NackMessage, RejectMessage
from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsRouter, NatsSecurity, NatsUserPassword, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.publisher.usecase import LogicPublisher
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StreamConfig,
)
from nats.js.errors import BadRequestError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from tidepool_contracts.access import Access
from tidepool_contracts.channels import BUCKETS, STREAMS, Bucket, Channel, Stream, stream_subjects
from tidepool_runtime.nats_auth import inbox_prefix, kv_stream

ModelT = TypeVar("ModelT", bound=BaseModel)
# Services name `Msg` (a JetStream message a handler is given) and `KeyValue` (a bucket) from here.
log = structlog.get_logger("tidepool.bus")
TOPOLOGY_RETRY_SECONDS = 60.0
TOPOLOGY_RETRY_DELAY_SECONDS = 1.0

Registrar = NatsBroker | NatsRouter


class PermanentError(Exception):
    """A message that can never succeed: terminate it instead of redelivering."""


def nak_delay(delivered: int) -> float:
    """Seconds before a failed message is offered again: 1, 2, 4 … 30 (delivered = attempts so far)."""
    return min(30.0, 0.5 * 2 ** min(delivered, 6))


def _jetstream_msg(msg: StreamMessage[Any]) -> Msg | None:
    raw = msg.raw_message
    if isinstance(raw, Msg) and raw.reply and raw.reply.startswith("$JS.ACK."):
        return raw
    return None


class DeliveryPolicyMiddleware(BaseMiddleware):
    """Nak with backoff on failure, term poison messages (JetStream messages only; core ones just log)."""

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        try:
            return await call_next(msg)
        except (HandlerException, asyncio.CancelledError):
            raise
        except (ValidationError, orjson.JSONDecodeError, PermanentError) as error:
            log.error("bus.message_terminated", subject=_subject(msg), error=str(error))
            if _jetstream_msg(msg) is not None:
                raise RejectMessage() from error
            raise
        except Exception as error:
            raw = _jetstream_msg(msg)
            if raw is None:
                log.exception("bus.handler_failed", subject=_subject(msg), error=str(error))
                raise
            delivered = raw.metadata.num_delivered or 1
            log.exception("bus.handler_failed", subject=_subject(msg), delivered=delivered, error=str(error))
            raise NackMessage(delay=nak_delay(delivered)) from error


class LogContextMiddleware(BaseMiddleware):
    """Everything logged while handling a message carries its subject and, when it has one, the sandbox id."""

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        fields: dict[str, Any] = {"subject": _subject(msg)}
        with contextlib.suppress(Exception):
            body = await msg.decode()
            if isinstance(body, dict) and body.get("sandbox_id"):
                fields["sandbox_id"] = body["sandbox_id"]
        with structlog.contextvars.bound_contextvars(**fields):
            return await call_next(msg)


def _subject(msg: StreamMessage[Any]) -> str:
    return str(getattr(msg.raw_message, "subject", "") or "")


# FastStream's own lines (one per message, task start/stop) only from WARNING on: ours say what matters.
_faststream_log = logging.getLogger("tidepool.faststream")
_faststream_log.setLevel(logging.WARNING)


def create_broker(
    nats_url: str, name: str, *, user: str = "", password: str = "", ca_file: str = ""
) -> NatsBroker:
    """A broker that reconnects forever, with the telemetry, log-context and delivery-policy middlewares.

    `user`/`password`: the service's NATS login (`tidepool_runtime.nats_auth`); its replies then come on its
    own inbox prefix, the only one it may subscribe to. `ca_file`: trust this CA for a `tls://` URL.
    """
    options: dict[str, Any] = {}
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    if user:
        options["security"] = NatsUserPassword(user, password, ssl_context=context)
        options["inbox_prefix"] = inbox_prefix(user)
    elif context is not None:
        options["security"] = NatsSecurity(ssl_context=context)
    return NatsBroker(
        nats_url,
        name=name,
        **options,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
        connect_timeout=5,
        middlewares=(NatsTelemetryMiddleware(), LogContextMiddleware, DeliveryPolicyMiddleware),
        logger=_faststream_log,
        log_level=logging.DEBUG,
    )


def jetstream_subscriber(
    registrar: Registrar,
    channel: Channel[Any],
    *,
    durable: str,
    subject: str | None = None,
    ack_wait: float = 30.0,
    max_deliver: int = 20,
    concurrency: int = 1,
) -> Any:
    """A durable pull consumer of `channel` (all its subjects, or the one `subject`), explicit ack.

    A handler runs while its message is unacked, so a crash of the process means redelivery to the next
    instance after `ack_wait` seconds; long handlers call `keep_in_progress`. At most `concurrency` messages
    of this consumer are handled at once; `max_deliver` bounds the deliveries of one message.
    """
    assert channel.stream is not None, f"{channel.subject} is request/reply, not on a stream"
    subject = subject or channel.filter
    config = ConsumerConfig(
        durable_name=durable,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.ALL,
    )
    return registrar.subscriber(
        subject,
        stream=JStream(channel.stream.name, declare=False),
        durable=durable,
        config=config,
        pull_sub=PullSub(batch_size=concurrency, timeout=1.0),
        max_workers=concurrency,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title=f"{durable} <- {subject}",
        description=channel.description,
    )


def replay_subscriber(registrar: Registrar, channel: Channel[Any], *, service: str) -> Any:
    """An ordered, ephemeral consumer: replays everything the stream retains on `channel`, then follows."""
    assert channel.stream is not None
    return registrar.subscriber(
        channel.filter,
        stream=JStream(channel.stream.name, declare=False),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.MANUAL,
        title=f"{service} (replay) <- {channel.filter}",
        description=channel.description,
    )


def follow_subscriber(registrar: Registrar, channel: Channel[Any], *, service: str) -> Any:
    """An ordered, ephemeral consumer of what is published on `channel` from now on (nothing replayed): for
    live views of a stream that another reader keeps (e.g. the latest resource sample of each sandbox)."""
    assert channel.stream is not None
    return registrar.subscriber(
        channel.filter,
        stream=JStream(channel.stream.name, declare=False),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.MANUAL,
        title=f"{service} (live) <- {channel.filter}",
        description=channel.description,
    )


def reply_subscriber(registrar: Registrar, channel: Channel[Any], *, queue: str) -> Any:
    """A core NATS responder for a request/reply channel; the queue group spreads requests over replicas."""
    assert channel.reply is not None
    return registrar.subscriber(
        channel.subject, queue=queue, title=f"{queue} <- {channel.subject}", description=channel.description
    )


def declare_publishers(
    registrar: Registrar, *channels: Channel[Any], service: str
) -> dict[Channel[Any], LogicPublisher]:
    """One FastStream publisher per channel `service` sends on (documented in AsyncAPI with its model)."""
    publishers: dict[Channel[Any], LogicPublisher] = {}
    for channel in channels:
        publishers[channel] = registrar.publisher(
            channel.subject,
            stream=JStream(channel.stream.name, declare=False) if channel.stream else None,
            schema=channel.model,
            title=f"{service} -> {channel.subject}",
            description=channel.description,
        )
    return publishers


class Bus:
    """One service's bus: its broker, its publishers, its KV handles."""

    def __init__(
        self,
        broker: NatsBroker,
        publishers: dict[Channel[Any], LogicPublisher] | None = None,
        access: Access | None = None,
        replicas: int = 1,
        *,
        create_streams: bool = True,
    ) -> None:
        """`access`: the service's part of the bus (`tidepool_contracts.access`): only its streams and
        buckets are declared and handed out. None: all of them (tests, tools on an open server).
        `replicas`: of the streams and buckets it creates (`TIDEPOOL_NATS_REPLICAS`, 3 on 3 nodes).
        `create_streams` (`TIDEPOOL_BUS_CREATE_STREAMS`): False only checks that they exist (deploy/k8s,
        where the bus-init Job creates them)."""
        self.broker = broker
        self.replicas = replicas
        self.create_streams = create_streams
        self.publishers: dict[Channel[Any], LogicPublisher] = dict(publishers or {})
        self.access = access

    @property
    def jetstream(self) -> JetStreamContext:
        """The connection's JetStream context, for tests and tools that inspect streams (services don't)."""
        return self.broker.config.connection_state.stream

    def add_publishers(self, publishers: dict[Channel[Any], LogicPublisher]) -> None:
        self.publishers.update(publishers)

    async def connect(self) -> None:
        """Connect (subscribers are not started yet: `start`) and declare the topology.

        A JetStream API request that times out (a busy or just-elected server) is retried for up to
        `TOPOLOGY_RETRY_SECONDS`: declaring is idempotent, and a service that gave up at start would only be
        restarted to do the same."""
        await self.broker.connect()
        deadline = asyncio.get_running_loop().time() + TOPOLOGY_RETRY_SECONDS
        while True:
            try:
                if self.create_streams:
                    await declare_topology(self.broker, self.access, replicas=self.replicas)
                else:
                    await verify_topology(self.broker, self.access)
                return
            except NatsTimeoutError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("bus.topology_timeout", retry_in=TOPOLOGY_RETRY_DELAY_SECONDS)
                await asyncio.sleep(TOPOLOGY_RETRY_DELAY_SECONDS)

    async def start(self) -> None:
        """Start every subscriber registered on the broker (connected first, if it is not yet).

        FastStream gives each JetStream subscriber its own inbox prefix (`_INBOX.` by default) instead of
        the connection's; a service may subscribe only under its own (`nats_auth.inbox_prefix`), so its
        subscribers are given the connection's prefix here.
        """
        if not self.broker.config.connection_state:
            await self.broker.connect()
        prefix = self.broker.config.connection_state.connection.new_inbox().rsplit(".", 1)[0] + "."
        for subscriber in self.broker.subscribers:
            options = getattr(subscriber, "extra_options", None)
            if isinstance(options, dict) and "inbox_prefix" in options:
                options["inbox_prefix"] = prefix.encode()
        await self.broker.start()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.broker.stop()

    async def kv(self, bucket: Bucket[Any]) -> KeyValue:
        """The bucket's handle; PermissionError for a bucket the service's access does not include."""
        if self.access is not None and bucket not in self.access.buckets:
            raise PermissionError(f"bucket {bucket.name} is not in this service's access")
        return await self.broker.key_value(bucket.name, declare=False)

    async def publish(
        self, channel: Channel[ModelT], model: ModelT, *, msg_id: str | None = None, **tokens: str
    ) -> None:
        """Publish `model` on the channel's subject filled with `tokens` (durably: the channel's stream).

        `msg_id` makes a retried publish a no-op within the stream's duplicate window.
        Raises TypeError for a model that is not the channel's, KeyError for an undeclared channel.
        """
        if not isinstance(model, channel.model):
            raise TypeError(
                f"{type(model).__name__} on {channel.subject}, which carries {channel.model.__name__}"
            )
        publisher = self.publishers[channel]
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await publisher.publish(model, subject=channel.address(**tokens), headers=headers)

    async def request(self, channel: Channel[ModelT], model: ModelT, *, timeout: float) -> BaseModel:
        """Ask on a request/reply channel; wait up to `timeout` seconds for the answer (its reply model)."""
        if not isinstance(model, channel.model) or channel.reply is None:
            raise TypeError(f"{type(model).__name__} is not a request on {channel.subject}")
        response = await self.broker.request(model, channel.subject, timeout=timeout)
        return channel.reply.model_validate(await response.decode())


async def connect(
    nats_url: str,
    name: str,
    publishes: tuple[Channel[Any], ...] = (),
    *,
    access: Access | None = None,
    replicas: int = 1,
    create_streams: bool = True,
    **login: str,
) -> Bus:
    """A connected bus with the topology declared, publishers for `publishes`, and no subscribers.

    `login`: `user`, `password`, `ca_file` of `create_broker`; `access`, `replicas`, `create_streams` as
    for `Bus`."""
    broker = create_broker(nats_url, name, **login)
    bus = Bus(
        broker,
        declare_publishers(broker, *publishes, service=name),
        access,
        replicas,
        create_streams=create_streams,
    )
    await bus.connect()
    return bus


def stream_config(stream: Stream, replicas: int = 1) -> StreamConfig:
    """The JetStream configuration of a stream of the channel table."""
    return StreamConfig(
        num_replicas=replicas,
        name=stream.name,
        subjects=stream_subjects(stream),
        retention=RetentionPolicy.WORK_QUEUE if stream.retention == "workqueue" else RetentionPolicy.LIMITS,
        max_age=stream.max_age,
        max_msgs_per_subject=stream.max_msgs_per_subject or -1,
        duplicate_window=stream.duplicate_window or 0.0,
    )


async def declare_topology(
    broker: NatsBroker, access: Access | None = None, *, replicas: int | None = None
) -> None:
    """Create or update every stream and bucket of the channel table (with `access`: those the service uses;
    it updates a stream's configuration only if it owns the topology, the API, else leaves it as it is).

    nats-py directly: FastStream declares a stream only for its subscribers, with only their subjects, and
    creates a bucket with a fixed configuration; here each stream gets all its channels' subjects and limits
    even in a service that only publishes, and an existing bucket is left as it is.

    `replicas`: JetStream replicas of what this call creates or updates (the bus-init Job of a NATS cluster:
    `tidepool_stack.bus_init`); None creates with one and keeps an existing stream's replica count, so a
    service's update never shrinks a stream that bus-init replicated.
    """
    js = broker.config.connection_state.stream
    streams = STREAMS if access is None else access.streams
    buckets = BUCKETS if access is None else access.buckets
    for stream in streams:
        config = stream_config(stream, replicas or 1)
        try:
            await js.add_stream(config=config)
        except BadRequestError:
            if access is None or access.owns_topology:
                if replicas is None:
                    config.num_replicas = (await js.stream_info(stream.name)).config.num_replicas
                await js.update_stream(config=config)
    for bucket in buckets:
        try:
            await js.key_value(bucket.name)
        except (NotFoundError, BadRequestError):
            with contextlib.suppress(BadRequestError):
                await js.create_key_value(
                    config=KeyValueConfig(
                        bucket=bucket.name, history=1, ttl=bucket.ttl, replicas=replicas or 1
                    )
                )


class MissingTopologyError(RuntimeError):
    """A stream or KV bucket a service uses does not exist (and the service may not create it)."""


async def verify_topology(broker: NatsBroker, access: Access | None = None) -> None:
    """Check that every stream and bucket of the channel table (with `access`: those the service uses)
    exists, creating nothing (`$JS.API.STREAM.INFO` only): the start of a service whose streams the bus-init
    Job makes (deploy/k8s). MissingTopologyError names the first one missing."""
    js = broker.config.connection_state.stream
    streams = STREAMS if access is None else access.streams
    buckets = BUCKETS if access is None else access.buckets
    names = [stream.name for stream in streams] + [kv_stream(bucket) for bucket in buckets]
    for name in names:
        try:
            await js.stream_info(name)
        except NotFoundError:
            raise MissingTopologyError(
                f"stream {name} does not exist: the bus-init Job (tidepool_stack.bus_init) creates it"
            ) from None


# KV values are the channel table's models as JSON.


def encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


def decode(model_type: type[ModelT], data: bytes) -> ModelT:
    return model_type.model_validate(orjson.loads(data))


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
    """Yield (key, value) for every current entry and then every change; value None means deleted.

    On the KeyValue handle FastStream gives (`broker.key_value`): its watch subscriber is a broker-wide
    handler started with the broker, while the proxy's caches each own a watch they restart after a failure.
    """
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


async def follow_subject(
    bus: Bus,
    channel: Channel[ModelT],
    subject: str,
    on_message: Callable[[ModelT, int], Awaitable[None]],
) -> Callable[[], Awaitable[None]]:
    """Replay one subject of a stream from its start and follow it; returns the function that stops it.

    `on_message(message, messages still pending)`. nats-py directly: a short-lived ordered consumer per HTTP
    request (one build's log), which FastStream's broker-wide subscribers are not made for.
    """
    assert channel.stream is not None

    async def deliver(msg: Msg) -> None:
        pending = msg.metadata.num_pending if msg.metadata else 0
        await on_message(decode(channel.model, msg.data), pending)

    js = bus.broker.config.connection_state.stream
    subscription = await js.subscribe(
        subject,
        cb=deliver,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        stream=channel.stream.name,
    )

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()

    return stop


async def subject_has_messages(bus: Bus, channel: Channel[Any], subject: str) -> bool:
    """Whether the stream holds anything on `subject` (nats-py: FastStream has no stream info)."""
    assert channel.stream is not None
    js = bus.broker.config.connection_state.stream
    info = await js.stream_info(channel.stream.name, subjects_filter=subject)
    return bool((info.state.subjects or {}).get(subject))


async def keep_in_progress(msg: Msg, interval: float = 5.0) -> None:
    """Tell JetStream a long handler is alive so the message is not redelivered meanwhile."""
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            await msg.in_progress()
