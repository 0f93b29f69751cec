"""Webhooks (issue #12 "Webhooks"; README "Webhooks") against a real stack (NATS, PostgreSQL, Podman), with
sandboxes made by the official SDK and a receiver on loopback that verifies every message with the
`standardwebhooks` library.

The receiver is stopped for 30 s (until the API's delivery log shows it has been retrying for that long)
while sandboxes change, then restarted: after deduplication by `webhook-id` it has every event exactly
once, and each sandbox's events arrive in the order of its changes (each `oldState` is the previous
`newState`, ending in the state the SDK reports). Another organization sees and touches none of it (404).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web
from daytona import Daytona, DaytonaConfig
from standardwebhooks import Webhook, WebhookVerificationError

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration]

OUTAGE_SECONDS = 30


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Receiver:
    """An aiohttp server on its own loop and thread; it can be stopped (connections refused) and restarted
    on the same port. Every request is verified; a bad signature is kept as a failure, never accepted."""

    port: int = field(default_factory=free_port)
    secret: str = ""
    arrivals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (webhook-id, payload)
    bad_signatures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/tidepool"

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as error:
            with self.lock:
                self.bad_signatures.append(str(error))
            return web.Response(status=400)
        with self.lock:
            self.arrivals.append((request.headers["webhook-id"], payload))
        return web.Response(status=204)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/tidepool", self._receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        self.runner = None

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)

    def close(self) -> None:
        if self.runner is not None:
            self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def unique(self) -> dict[str, dict[str, Any]]:
        """Deduplicated by webhook-id, in first-arrival order; a repeated id must carry the same payload."""
        seen: dict[str, dict[str, Any]] = {}
        with self.lock:
            for message_id, payload in self.arrivals:
                if message_id in seen:
                    assert seen[message_id] == payload, f"{message_id} came back with another payload"
                    continue
                seen[message_id] = payload
        return seen

    def of_sandbox(self, sandbox_id: str) -> list[dict[str, Any]]:
        return [
            payload
            for payload in self.unique().values()
            if payload["event"].startswith("sandbox.") and payload["id"] == sandbox_id
        ]


def create_organization(stack: StackThread) -> tuple[str, str]:
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"hooks-{uuid.uuid4().hex[:6]}"},
        headers=bearer(stack.api_key),
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"]), str(created.json()["apiKey"]["value"])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.start()
    try:
        yield running
    finally:
        running.close()


def chain_ends_in(events: list[dict[str, Any]], final_state: str) -> bool:
    """The events of one sandbox, in arrival order, are its whole history up to `final_state`: created
    first, then each update starting where the last one ended."""
    if not events or events[0]["event"] != "sandbox.created":
        return False
    state = events[0]["state"]
    for update in events[1:]:
        assert update["event"] == "sandbox.state.updated", update
        assert update["oldState"] == state, f"out of order or missing: {events}"
        state = update["newState"]
    return state == final_state


def parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


def test_receiver_down_for_30_seconds_gets_every_event_once_in_order(
    stack: StackThread, receiver: Receiver
) -> None:
    organization_id, key = create_organization(stack)
    api = httpx.Client(base_url=stack.api_url, headers=bearer(key), timeout=30)
    created = api.post(
        "/webhooks/endpoints",
        json={"url": receiver.url, "description": "ci receiver", "eventTypes": []},
    )
    assert created.status_code == 201, created.text
    endpoint = created.json()
    receiver.secret = endpoint["secret"]
    assert endpoint["secret"].startswith("whsec_") and endpoint["organizationId"] == organization_id
    shown = api.get(f"/webhooks/endpoints/{endpoint['id']}").json()
    assert "secret" not in shown and shown["url"] == receiver.url

    daytona = Daytona(DaytonaConfig(api_key=key, api_url=stack.api_url))
    try:
        first = daytona.create()
        wait_until(
            lambda: chain_ends_in(receiver.of_sandbox(first.id), "started"),
            lambda: f"events of {first.id}: {receiver.of_sandbox(first.id)}",
            timeout=120,
        )
        created_event = receiver.of_sandbox(first.id)[0]
        assert created_event["organizationId"] == organization_id
        assert created_event["sandboxClass"] == "container"
        assert set(created_event) == {
            "event",
            "timestamp",
            "id",
            "organizationId",
            "state",
            "sandboxClass",
            "createdAt",
        }

        # The receiver goes away; the sandboxes keep changing.
        receiver.stop()
        stopped_at = datetime.now(UTC)
        daytona.stop(first)
        second = daytona.create()
        daytona.delete(second)

        def retried_for_the_outage() -> bool:
            listed = api.get(f"/webhooks/endpoints/{endpoint['id']}/attempts", params={"limit": 1000})
            failed = [a for a in listed.json() if a["statusCode"] is None and a["error"]]
            outage_end = stopped_at + timedelta(seconds=OUTAGE_SECONDS)
            return any(parse(a["attemptedAt"]) >= outage_end for a in failed)

        wait_until(retried_for_the_outage, "the API never retried for 30 s", timeout=OUTAGE_SECONDS + 120)

        receiver.start()
        wait_until(
            lambda: (
                chain_ends_in(receiver.of_sandbox(first.id), "stopped")
                and chain_ends_in(receiver.of_sandbox(second.id), "destroyed")
            ),
            lambda: f"{receiver.of_sandbox(first.id)}\n{receiver.of_sandbox(second.id)}",
            timeout=180,
        )
        assert first.id != second.id
        assert receiver.bad_signatures == []

        # Exactly once after dedup: the API's own list of messages for the endpoint, all delivered, is what
        # the receiver has; nothing more, nothing less.
        def deliveries() -> list[dict[str, Any]]:
            listed = api.get(f"/webhooks/endpoints/{endpoint['id']}/deliveries", params={"limit": 1000})
            return list(listed.json())

        def all_delivered() -> bool:
            listed = deliveries()
            return bool(listed) and all(d["status"] == "delivered" for d in listed)

        wait_until(all_delivered, "deliveries never completed")
        assert {d["messageId"] for d in deliveries()} == set(receiver.unique())
        # The delivery log has the failures (no answer) and the successes that followed.
        attempts = api.get(f"/webhooks/endpoints/{endpoint['id']}/attempts", params={"limit": 1000}).json()
        assert any(a["statusCode"] is None and a["error"] for a in attempts)
        assert {a["messageId"] for a in attempts if a["statusCode"] == 204} == set(receiver.unique())
    finally:
        # The endpoint first (its pending messages go with it), then its sandboxes: nothing is retried to a
        # receiver port that a later test may reuse.
        api.delete(f"/webhooks/endpoints/{endpoint['id']}")
        for sandbox in daytona.list():
            daytona.delete(sandbox)


def test_another_organization_cannot_see_or_touch_the_endpoint(stack: StackThread) -> None:
    _, owner_key = create_organization(stack)
    _, other_key = create_organization(stack)
    owner = httpx.Client(base_url=stack.api_url, headers=bearer(owner_key), timeout=30)
    other = httpx.Client(base_url=stack.api_url, headers=bearer(other_key), timeout=30)
    created = owner.post("/webhooks/endpoints", json={"url": "https://hooks.example.com/a"})
    assert created.status_code == 201, created.text
    endpoint_id = created.json()["id"]
    base = f"/webhooks/endpoints/{endpoint_id}"
    assert other.get(base).status_code == 404
    assert other.patch(base, json={"url": "https://evil.example.com/"}).status_code == 404
    assert other.post(f"{base}/rotate-secret").status_code == 404
    assert other.get(f"{base}/attempts").status_code == 404
    assert other.get(f"{base}/deliveries").status_code == 404
    assert other.delete(base).status_code == 404
    assert other.get("/webhooks/endpoints").json() == []
    # Untouched: still the owner's, with its URL.
    assert owner.get(base).json()["url"] == "https://hooks.example.com/a"
    # The owner's own management: update, rotate (a new secret), delete.
    updated = owner.patch(base, json={"eventTypes": ["sandbox.created"], "enabled": False})
    assert updated.status_code == 200 and updated.json()["eventTypes"] == ["sandbox.created"]
    assert updated.json()["enabled"] is False
    rotated = owner.post(f"{base}/rotate-secret")
    assert rotated.status_code == 200 and rotated.json()["secret"].startswith("whsec_")
    assert rotated.json()["secret"] != created.json()["secret"]
    assert (
        owner.post("/webhooks/endpoints", json={"url": "https://x/", "eventTypes": ["nope"]}).status_code
        == 400
    )
    assert owner.delete(base).status_code == 204
    assert owner.get(base).status_code == 404
