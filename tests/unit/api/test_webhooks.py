"""Webhooks in the API (tidepool_api.webhooks, tidepool_api.webhook_delivery) against a real nats-server
and SQLite, or PostgreSQL (a fresh database) when TIDEPOOL_DATABASE_URL names a server: the outbox commits
with the change, the relay and the fan-out on JetStream, and the deliverer's signatures, retries and
per-resource order, with a receiver on loopback (allowed by TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS, but for
the tests of the address rules, which run without it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlmodel import select
from standardwebhooks import Webhook

from tests.conftest import free_port
from tests.integration.stackthread import drop_postgres_database, fresh_postgres_database
from tests.polling import wait_until_async
from tidepool_api import webhooks
from tidepool_api.auth import Authenticator
from tidepool_api.context import ApiContext
from tidepool_api.db import (
    Database,
    Organization,
    Volume,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookOutbox,
)
from tidepool_api.errors import ApiError
from tidepool_api.migrate import migrate
from tidepool_api.secrets_box import SecretBox
from tidepool_api.subscribers import register
from tidepool_api.webhook_delivery import (
    backoff_seconds,
    deliver_due,
    deliver_forever,
    fan_out,
    guarded_session,
    relay_outbox,
)
from tidepool_api.webhooks import SESSION_WAKE
from tidepool_contracts import channels
from tidepool_contracts.models import WebhookEvent, WebhookEventType
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.settings import Settings


@pytest.fixture
def database_url() -> Iterator[str]:
    base_url = os.environ.get("TIDEPOOL_DATABASE_URL", "")
    if not base_url:
        yield ""  # SQLite in the data directory
        return
    url, name = fresh_postgres_database(base_url)
    yield url
    drop_postgres_database(base_url, name)


@pytest.fixture
def allowed_cidrs() -> list[str]:
    """The operator's allow-list: the receiver on loopback (a test of the address rules overrides it)."""
    return ["127.0.0.1/32"]


@pytest.fixture
async def context(
    nats_url: str, tmp_path: Path, database_url: str, allowed_cidrs: list[str]
) -> AsyncIterator[ApiContext]:
    settings = Settings(
        data_dir=tmp_path,
        nats_url=nats_url,
        database_url=database_url,
        tenant_endpoint_allowed_cidrs=allowed_cidrs,
        webhook_allow_insecure_urls=True,
        webhook_retry_base_seconds=0.05,
        webhook_retry_max_seconds=0.2,
        webhook_poll_seconds=0.1,
    )
    await migrate(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    bus = Bus(create_broker(nats_url, f"test-api-{uuid.uuid4().hex[:6]}"))
    await bus.connect()
    built = ApiContext(
        settings=settings,
        database=database,
        bus=bus,
        desired_kv=await bus.kv(channels.DESIRED),
        api_keys_kv=await bus.kv(channels.API_KEYS),
        authenticator=Authenticator(database),
        secret_box=SecretBox("unit-test-key"),
    )
    database.sessions.configure(info={SESSION_WAKE: built.webhook_outbox_wake})
    bus.add_publishers(register(bus.broker, built))
    async with database.sessions() as session:
        for organization_id in ("org-a", "org-b"):
            session.add(Organization(id=organization_id, name=organization_id))
        await session.commit()
    await bus.start()
    yield built
    await bus.close()
    await database.close()


def volume(organization_id: str, name: str) -> Volume:
    return Volume(id=str(uuid.uuid4()), organization_id=organization_id, name=name, state="creating")


async def outbox(context: ApiContext) -> list[WebhookOutbox]:
    async with context.database.sessions() as session:
        return list((await session.exec(select(WebhookOutbox))).all())


async def deliveries(context: ApiContext) -> list[WebhookDelivery]:
    async with context.database.sessions() as session:
        return list((await session.exec(select(WebhookDelivery))).all())


async def test_a_message_commits_with_its_change_or_not_at_all(context: ApiContext) -> None:
    async with context.database.sessions() as session:
        kept = volume("org-a", "kept")
        session.add(kept)
        webhooks.record_volume_created(session, kept)
        await session.commit()
    assert context.webhook_outbox_wake.is_set()  # the commit woke the relay
    async with context.database.sessions() as session:
        dropped = volume("org-a", "dropped")
        session.add(dropped)
        webhooks.record_volume_created(session, dropped)
        await session.rollback()
    [row] = await outbox(context)
    assert row.event_type == "volume.created" and row.ordering_key == f"volume:{kept.id}"
    assert row.payload["event"] == "volume.created" and row.payload["name"] == "kept"
    assert set(row.payload) == {"event", "timestamp", "id", "name", "organizationId", "state", "createdAt"}


async def test_the_relay_fans_out_once_to_subscribed_endpoints_of_its_organization(
    context: ApiContext,
) -> None:
    everything, _ = await webhooks.create_endpoint(context, "org-a", "https://192.0.0.9/1", [], True, "")
    sandboxes_only, _ = await webhooks.create_endpoint(
        context, "org-a", "https://192.0.0.9/2", ["sandbox.created"], True, ""
    )
    other_tenant, _ = await webhooks.create_endpoint(context, "org-b", "https://192.0.0.9/", [], True, "")
    async with context.database.sessions() as session:
        made = volume("org-a", "v")
        session.add(made)
        webhooks.record_volume_created(session, made)
        await session.commit()
    assert await relay_outbox(context) == 1
    assert await outbox(context) == []  # relayed rows leave the outbox

    async def fanned_out() -> list[WebhookDelivery]:
        return await deliveries(context)

    [delivery] = await wait_until_async(fanned_out, "the fan-out never made the delivery")
    assert delivery.endpoint_id == everything.id and delivery.event_type == "volume.created"
    assert sandboxes_only.id != delivery.endpoint_id and other_tenant.id != delivery.endpoint_id
    # A redelivered bus message makes nothing new (idempotent).
    again = WebhookEvent(
        id=delivery.message_id,
        organization_id="org-a",
        event_type=WebhookEventType.VOLUME_CREATED,
        ordering_key=delivery.ordering_key,
        sequence=delivery.sequence,
        payload=delivery.payload,
    )
    assert await fan_out(context, again) == 0
    assert len(await deliveries(context)) == 1


async def test_the_secret_is_sealed_at_rest_and_the_url_must_be_https(context: ApiContext) -> None:
    endpoint, secret = await webhooks.create_endpoint(context, "org-a", "https://192.0.0.9/", [], True, "")
    assert secret.startswith("whsec_") and secret not in endpoint.secret_sealed
    assert webhooks.open_secret(context, endpoint) == secret
    context.settings.webhook_allow_insecure_urls = False
    with pytest.raises(Exception, match="https"):
        await webhooks.create_endpoint(context, "org-a", "http://192.0.0.9/", [], True, "")
    with pytest.raises(Exception, match="not found"):
        await webhooks.get_endpoint(context, "org-b", endpoint.id)


def test_backoff_doubles_up_to_its_ceiling(context: ApiContext) -> None:
    assert [backoff_seconds(context, n) for n in (1, 2, 3, 4, 5)] == [0.05, 0.1, 0.2, 0.2, 0.2]


async def test_signed_retried_and_in_order_per_resource(context: ApiContext) -> None:
    """Resource A's first message fails three times: A's second waits for it; resource B's goes meanwhile."""
    port = free_port()
    received: list[tuple[str, dict[str, Any]]] = []
    failures_left = {"a1": 3}
    endpoint, secret = await webhooks.create_endpoint(
        context, "org-a", f"http://127.0.0.1:{port}/hook", [], True, ""
    )

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        payload = Webhook(secret).verify(body, dict(request.headers))  # raises on a bad signature
        if failures_left.get(payload["name"], 0) > 0:
            failures_left[payload["name"]] -= 1
            return web.Response(status=503, text="busy")
        received.append((request.headers["webhook-id"], payload))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    deliverer = asyncio.create_task(deliver_forever(context))
    try:
        for sequence, (key, name) in enumerate([("a", "a1"), ("a", "a2"), ("b", "b1")], start=1):
            event = WebhookEvent(
                id=f"msg_{name}",
                organization_id="org-a",
                event_type=WebhookEventType.VOLUME_STATE_UPDATED,
                ordering_key=f"volume:{key}",
                sequence=sequence,
                payload={"event": "volume.state.updated", "name": name},
            )
            assert await fan_out(context, event) == 1

        async def all_delivered() -> bool:
            # The receiver answers before the deliverer records the outcome: wait for both.
            done = all(delivery.status == "delivered" for delivery in await deliveries(context))
            return done and len(received) == 3

        await wait_until_async(all_delivered, lambda: f"received: {received}")
    finally:
        deliverer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await deliverer
        await runner.cleanup()
    names = [payload["name"] for _, payload in received]
    assert names.index("a1") < names.index("a2")
    assert names.index("b1") < names.index("a1")  # b was not held up by a's failures
    async with context.database.sessions() as session:
        attempts = list((await session.exec(select(WebhookAttempt))).all())
        states = list((await session.exec(select(WebhookDelivery))).all())
    assert all(delivery.status == "delivered" for delivery in states)
    a1 = sorted((a for a in attempts if a.message_id == "msg_a1"), key=lambda a: a.attempt)
    assert [a.status_code for a in a1] == [503, 503, 503, 200]
    # The status and its standard phrase; never what the receiver answered ("busy").
    assert [a.error for a in a1] == ["HTTP 503 Service Unavailable"] * 3 + [None]
    first_a2 = min(a.attempted_at for a in attempts if a.message_id == "msg_a2")
    assert first_a2 >= a1[-1].attempted_at  # a2 was not tried before a1 was delivered
    assert {a.endpoint_id for a in attempts} == {endpoint.id}


# The address rules (SSRF): tenants' URLs reach public addresses only, unless the operator allows a network.


@pytest.mark.parametrize("allowed_cidrs", [[]])
@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://172.16.0.1/hook", "private"),
        ("http://192.168.1.1/hook", "private"),
        ("http://[fd00::1]/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://100.64.0.1/hook", "CGNAT"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://0.0.0.0/hook", "unspecified"),
    ],
)
async def test_a_url_that_reaches_a_non_public_address_is_refused_when_saved(
    context: ApiContext, url: str, kind: str
) -> None:
    with pytest.raises(ApiError, match=kind) as refused:
        await webhooks.create_endpoint(context, "org-a", url, [], True, "")
    assert refused.value.status_code == 400
    assert "public address" in str(refused.value)
    public, _ = await webhooks.create_endpoint(context, "org-a", "http://192.0.0.9/hook", [], True, "")
    with pytest.raises(ApiError, match=kind) as refused:
        await webhooks.update_endpoint(context, "org-a", public.id, {"url": url})
    assert refused.value.status_code == 400
    assert (await webhooks.get_endpoint(context, "org-a", public.id)).url == "http://192.0.0.9/hook"


@pytest.mark.parametrize("allowed_cidrs", [[]])
async def test_a_host_that_does_not_resolve_yet_is_accepted_for_the_deliverer_to_judge(
    context: ApiContext,
) -> None:
    endpoint, _ = await webhooks.create_endpoint(
        context, "org-a", "https://no-such-host.invalid/", [], True, ""
    )
    assert endpoint.url == "https://no-such-host.invalid/"


@pytest.mark.parametrize("allowed_cidrs", [["10.1.0.0/16", "127.0.0.1"]])
async def test_the_operator_allows_networks_on_purpose(context: ApiContext) -> None:
    for url in ("http://10.1.2.3/hook", "http://127.0.0.1:9/hook", "http://[::ffff:127.0.0.1]/hook"):
        await webhooks.create_endpoint(context, "org-a", url, [], True, "")
    with pytest.raises(ApiError, match="private"):
        await webhooks.create_endpoint(context, "org-a", "http://10.2.0.1/hook", [], True, "")


async def receiver_on_loopback(answer: web.Response) -> tuple[int, list[bytes], web.AppRunner]:
    port = free_port()
    received: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.read())
        return answer

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return port, received, runner


async def pending_delivery(context: ApiContext, name: str) -> None:
    event = WebhookEvent(
        id=f"msg_{name}",
        organization_id="org-a",
        event_type=WebhookEventType.VOLUME_CREATED,
        ordering_key=f"volume:{name}",
        sequence=1,
        payload={"event": "volume.created", "name": name},
    )
    assert await fan_out(context, event) == 1


async def attempts_of(context: ApiContext) -> list[WebhookAttempt]:
    async with context.database.sessions() as session:
        return list((await session.exec(select(WebhookAttempt))).all())


@pytest.mark.parametrize("allowed_cidrs", [[]])
async def test_a_name_that_resolves_to_loopback_later_is_refused_at_connect_time(
    context: ApiContext,
) -> None:
    """DNS rebinding: the URL passed the check when saved (here: written past it), its name now resolves to
    loopback. The deliverer's connector refuses the address and logs why; the receiver gets nothing."""
    port, received, runner = await receiver_on_loopback(web.Response(status=200))
    endpoint, _ = await webhooks.create_endpoint(context, "org-a", "http://192.0.0.9/hook", [], True, "")
    async with context.database.sessions() as session:
        row = await session.get(WebhookEndpoint, endpoint.id)
        assert row is not None
        row.url = f"http://localhost:{port}/hook"
        session.add(row)
        await session.commit()
    await pending_delivery(context, "rebound")
    try:
        async with guarded_session(context) as http:
            assert await deliver_due(context, http) == 1
    finally:
        await runner.cleanup()
    [attempt] = await attempts_of(context)
    assert received == []
    assert attempt.status_code is None and attempt.error is not None
    assert attempt.error.startswith("Blocked:") and "loopback" in attempt.error
    assert "TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS" in attempt.error


async def test_the_receivers_answer_is_never_kept(context: ApiContext) -> None:
    """What an address answered must not reach the tenant: the log keeps the status and its phrase."""
    port, received, runner = await receiver_on_loopback(
        web.Response(status=418, text='{"AccessKeyId": "internal-secret"}')
    )
    endpoint, _ = await webhooks.create_endpoint(
        context, "org-a", f"http://127.0.0.1:{port}/hook", [], True, ""
    )
    await pending_delivery(context, "answered")
    try:
        async with guarded_session(context) as http:
            assert await deliver_due(context, http) == 1
    finally:
        await runner.cleanup()
    assert len(received) == 1
    [attempt] = await webhooks.list_attempts(context, "org-a", endpoint.id, 10)
    assert (attempt.status_code, attempt.error) == (418, "HTTP 418 I'm a Teapot")


async def test_a_disabled_endpoints_messages_are_given_up_at_their_age(context: ApiContext) -> None:
    endpoint, _ = await webhooks.create_endpoint(context, "org-a", "http://192.0.0.9/hook", [], True, "")
    await pending_delivery(context, "unsent")
    await webhooks.update_endpoint(context, "org-a", endpoint.id, {"enabled": False})
    async with guarded_session(context) as http:
        assert await deliver_due(context, http) == 0  # not old yet: kept for when it is enabled again
        assert [delivery.status for delivery in await deliveries(context)] == ["pending"]
        context.settings.webhook_give_up_seconds = 0.0
        assert await deliver_due(context, http) == 0
    assert [delivery.status for delivery in await deliveries(context)] == ["failed"]
    assert await attempts_of(context) == []  # nothing was sent


async def test_a_secret_that_cannot_be_opened_is_a_failed_attempt(context: ApiContext) -> None:
    port, received, runner = await receiver_on_loopback(web.Response(status=200))
    endpoint, _ = await webhooks.create_endpoint(
        context, "org-a", f"http://127.0.0.1:{port}/hook", [], True, ""
    )
    async with context.database.sessions() as session:
        row = await session.get(WebhookEndpoint, endpoint.id)
        assert row is not None
        row.secret_sealed = SecretBox("another-installations-key").seal(webhooks.new_secret())
        session.add(row)
        await session.commit()
    await pending_delivery(context, "unsigned")
    try:
        async with guarded_session(context) as http:
            assert await deliver_due(context, http) == 1
    finally:
        await runner.cleanup()
    assert received == []
    [attempt] = await attempts_of(context)
    assert attempt.status_code is None and attempt.error is not None and "secret" in attempt.error
    [delivery] = await deliveries(context)
    assert delivery.status == "pending" and delivery.attempts == 1  # retried: a rotation fixes it
