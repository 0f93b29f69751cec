"""The NATS permissions each service gets (tidepool_contracts.access -> tidepool_runtime.nats_auth) match what
its code registers on the bus: every publisher and subscriber is allowed, and nothing is granted that no
publisher or subscriber uses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
from faststream.nats import NatsBroker

from tidepool_api import subscribers as api
from tidepool_builder import subscribers as builder
from tidepool_contracts import channels
from tidepool_contracts.access import SERVICE_ACCESS
from tidepool_runner import subscribers as runner
from tidepool_runtime import nats_auth
from tidepool_runtime.broker import Bus
from tidepool_scheduler import subscribers as scheduler
from tidepool_telemetry import subscribers as telemetry

NO_DEPENDENCY: Any = cast(Any, None)


def registered(service: str) -> NatsBroker:
    """A never-connected broker with exactly what `service` registers (as scripts/asyncapi.py does)."""
    broker = NatsBroker("nats://127.0.0.1:4222")
    if service == "api":
        api.register(broker, NO_DEPENDENCY)
    elif service == "scheduler":
        scheduler.register(broker, NO_DEPENDENCY)
    elif service == "runner":
        runner.publishers(broker)
        runner.register_jobs(broker, "runner-one", NO_DEPENDENCY, 16)
    elif service == "builder":
        builder.register(broker, NO_DEPENDENCY)
    elif service == "telemetry":
        telemetry.register(broker, NO_DEPENDENCY, NO_DEPENDENCY)
    return broker  # the proxy registers nothing: it only reads buckets


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)


def allowed(allow: list[str], subject: str) -> bool:
    return any(matches(pattern, subject) for pattern in allow)


def concrete(subject: str) -> str:
    """A template's subject with every `{token}` filled."""
    return re.sub(r"\{\w+\}", "some-id", subject)


def stream_of(subscriber: Any) -> str | None:
    stream = getattr(subscriber, "stream", None)
    return stream.name if stream is not None else None


@pytest.mark.parametrize("service", sorted(SERVICE_ACCESS))
def test_every_publisher_and_subscriber_is_allowed(service: str) -> None:
    grant = nats_auth.permissions(SERVICE_ACCESS[service], service)
    publish, subscribe = grant["publish"]["allow"], grant["subscribe"]["allow"]
    broker = registered(service)
    for publisher in broker.publishers:
        assert allowed(publish, concrete(publisher.subject.template)), (
            f"{service} publishes on {publisher.subject}"
        )
    for subscriber in broker.subscribers:
        stream = stream_of(subscriber)
        if stream is None:
            assert allowed(subscribe, subscriber.subject.template), (
                f"{service} answers on {subscriber.subject}"
            )
            continue
        for needed in (
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.durable",
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.durable",
            f"$JS.ACK.{stream}.durable.1.1.1.1.1",
        ):
            assert allowed(publish, needed), f"{service} consumes {stream}: {needed}"
    assert allowed(subscribe, f"{nats_auth.inbox_prefix(service)}.nuid.token")


# Consumed outside a broker-wide subscriber: the API replays one build's log per request (follow_subject),
# the telemetry service reads one sandbox's samples per query (samples.py).
CONSUMED_PER_REQUEST = {
    "api": {channels.BUILD_LOG_LINES, channels.SANDBOX_FLOWS},
    "telemetry": {channels.SANDBOX_METRICS},
}


@pytest.mark.parametrize("service", sorted(SERVICE_ACCESS))
def test_nothing_is_granted_that_no_publisher_or_subscriber_uses(service: str) -> None:
    access = SERVICE_ACCESS[service]
    broker = registered(service)
    published = {publisher.subject.template for publisher in broker.publishers}
    assert published == {channel.subject for channel in (*access.publishes, *access.requests)}
    consumed = {s.subject.template for s in broker.subscribers if stream_of(s) is not None}
    declared = {
        channel.filter for channel in access.consumes if channel not in CONSUMED_PER_REQUEST.get(service, ())
    }
    if service == "runner":  # each runner consumes its own jobs' subject
        consumed = {
            channels.RUNNER_JOBS.filter
            for subject in consumed
            if matches(channels.RUNNER_JOBS.filter, subject)
        }
    assert consumed == declared
    answered = {s.subject.template for s in broker.subscribers if stream_of(s) is None}
    assert answered == {channel.subject for channel in access.answers}


@pytest.mark.parametrize(
    ("service", "subject"),
    [
        ("runner", "$JS.API.DIRECT.GET.KV_tidepool_api_keys.$KV.tidepool_api_keys.k"),
        ("runner", "$JS.API.STREAM.MSG.GET.KV_tidepool_signing_keys"),
        ("runner", "$JS.API.CONSUMER.CREATE.KV_tidepool_signing_keys"),
        ("runner", "$KV.tidepool_api_keys.k"),
        ("runner", "tidepool.job.build"),
        ("proxy", "tidepool.intent.sandbox.sb"),
        ("proxy", "$KV.tidepool_api_keys.k"),
        ("proxy", "$KV.tidepool_signing_keys.sb"),
        ("proxy", "$JS.API.STREAM.DELETE.KV_tidepool_api_keys"),
        ("builder", "$JS.API.STREAM.MSG.GET.KV_tidepool_signing_keys"),
        ("telemetry", "tidepool.event.sandbox.sb"),
        ("scheduler", "$KV.tidepool_api_keys.k"),
        ("scheduler", "$JS.API.STREAM.UPDATE.TIDEPOOL_JOBS"),
    ],
)
def test_what_a_service_may_not_publish(service: str, subject: str) -> None:
    grant = nats_auth.permissions(SERVICE_ACCESS[service], service)
    assert not allowed(grant["publish"]["allow"], subject)


def test_no_service_may_read_another_services_replies() -> None:
    for service in SERVICE_ACCESS:
        subscribe = nats_auth.permissions(SERVICE_ACCESS[service], service)["subscribe"]["allow"]
        for other in SERVICE_ACCESS:
            inbox = f"{nats_auth.inbox_prefix(other)}.nuid.token"
            assert allowed(subscribe, inbox) == (other == service), (service, other)
        assert not allowed(subscribe, "_INBOX.nuid.token")


def test_the_server_config_holds_only_hashes(tmp_path: Path) -> None:
    passwords = nats_auth.ensure_passwords(tmp_path / "nats-credentials.json")
    assert (tmp_path / "nats-credentials.json").stat().st_mode & 0o777 == 0o600
    assert nats_auth.ensure_passwords(tmp_path / "nats-credentials.json") == passwords  # reused
    hashes = {service: nats_auth.hash_password(password) for service, password in passwords.items()}
    text = nats_auth.server_config(hashes, host="127.0.0.1", port=4222, store_dir=str(tmp_path))
    assert not any(password in text for password in passwords.values())
    users = {user["user"]: user for user in json.loads(text)["authorization"]["users"]}
    assert set(users) == set(SERVICE_ACCESS)
    assert all(user["password"].startswith("$2") for user in users.values())


async def test_a_bus_hands_out_only_its_services_buckets() -> None:
    bus = Bus(NatsBroker("nats://127.0.0.1:4222"), access=SERVICE_ACCESS["runner"])
    with pytest.raises(PermissionError):
        await bus.kv(channels.API_KEYS)


SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"


@pytest.mark.parametrize("service", sorted(SERVICE_ACCESS))
def test_the_buckets_a_service_opens_are_exactly_its_buckets(service: str) -> None:
    """Every `.kv(channels.X)` in a service's code is a bucket of its access, and every such bucket is
    opened somewhere (a `Bus` refuses the others at run time too)."""
    source = "\n".join(path.read_text() for path in (SERVICES_DIR / service).rglob("*.py"))
    opened = set(re.findall(r"\.kv\(channels\.(\w+)\)", source))
    assert opened == {
        name for name in vars(channels) if getattr(channels, name) in SERVICE_ACCESS[service].buckets
    }


def test_only_the_api_can_write_api_keys_and_signing_keys() -> None:
    for service, access in SERVICE_ACCESS.items():
        publish = nats_auth.permissions(access, service)["publish"]["allow"]
        for bucket in (channels.API_KEYS, channels.SIGNING_KEYS):
            assert allowed(publish, f"$KV.{bucket.name}.some-key") == (service == "api"), (
                service,
                bucket.name,
            )
