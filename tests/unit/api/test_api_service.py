"""The API service alone, against a real nats-server and SQLite; runner events are published by the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.polling import wait_until_async
from tidepool_api.app import create_app
from tidepool_api.auth import Authenticator, hash_key
from tidepool_api.bootstrap import ensure_admin, mirror_api_keys
from tidepool_api.context import ApiContext
from tidepool_api.db import Database, Snapshot
from tidepool_api.migrate import migrate
from tidepool_api.subscribers import register
from tidepool_contracts import channels, subjects
from tidepool_contracts.models import (
    ApiKeyRecord,
    DaemonHealthEvent,
    DaemonHealthOutcome,
    DesiredSandbox,
    SandboxIntent,
    SandboxStateEvent,
)
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import Bus, create_broker, declare_publishers, decode, kv_get
from tidepool_runtime.settings import Settings


@pytest.fixture
async def api(nats_url: str, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, ApiContext, str]]:
    # SQLite explicitly: the integration stack covers PostgreSQL when TIDEPOOL_DATABASE_URL is set.
    settings = Settings(data_dir=tmp_path, nats_url=nats_url, database_url="", create_wait_seconds=0.5)
    await migrate(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    bus = Bus(create_broker(nats_url, "test-api"))
    await bus.connect()
    context = ApiContext(
        settings=settings,
        database=database,
        bus=bus,
        desired_kv=await bus.kv(channels.DESIRED),
        api_keys_kv=await bus.kv(channels.API_KEYS),
        authenticator=Authenticator(database),
    )
    bus.add_publishers(register(bus.broker, context))
    # The test plays the runner too.
    runner_channels = (channels.SANDBOX_EVENTS, channels.DAEMON_EVENTS)
    bus.add_publishers(declare_publishers(bus.broker, *runner_channels, service="test"))
    await ensure_admin(context)
    await mirror_api_keys(context)
    async with database.sessions() as session:
        session.add(
            Snapshot(id="snap", name="daytona-small", image_name="img:1", state="active", general=True)
        )
        await session.commit()
    await bus.start()
    key = (tmp_path / "admin-api-key").read_text().strip()
    transport = httpx.ASGITransport(app=create_app(context))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        yield client, context, key
    await bus.close()
    await database.close()


async def report(bus: Bus, sandbox_id: str, organization_id: str, state: SandboxState) -> None:
    event = SandboxStateEvent(
        sandbox_id=sandbox_id, organization_id=organization_id, state=state, source="test"
    )
    await bus.publish(channels.SANDBOX_EVENTS, event, sandbox_id=sandbox_id)


async def wait_state(client: httpx.AsyncClient, sandbox_id: str, state: str) -> dict[str, object]:
    async def reached() -> dict[str, object] | None:
        response = await client.get(f"/api/sandbox/{sandbox_id}")
        return response.json() if response.status_code == 200 and response.json()["state"] == state else None

    return await wait_until_async(reached, f"sandbox {sandbox_id} never reached {state}")


async def test_create_publishes_intent_and_desired_state(api) -> None:  # type: ignore[no-untyped-def]
    client, context, _ = api
    response = await client.post("/api/sandbox", json={"labels": {"code-toolbox-language": "python"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "creating"
    assert (body["cpu"], body["memory"], body["disk"]) == (1, 1, 3)
    assert body["toolboxProxyUrl"].endswith("/toolbox")
    assert body["createdAt"].endswith("Z")
    desired = await kv_get(context.desired_kv, body["id"], DesiredSandbox)
    assert desired is not None and desired.desired_state == "started" and desired.spec.image == "img:1"
    info = await context.bus.jetstream.stream_info(subjects.INTENTS_STREAM)
    assert info.state.messages >= 1
    subject = channels.SANDBOX_INTENTS.address(sandbox_id=body["id"])
    message = await context.bus.jetstream.get_last_msg(subjects.INTENTS_STREAM, subject)
    assert decode(SandboxIntent, message.data).action == "create"


async def test_runner_events_drive_the_state_machine(api) -> None:  # type: ignore[no-untyped-def]
    client, context, _ = api
    created = (await client.post("/api/sandbox", json={"name": "machine"})).json()
    sandbox_id, organization = created["id"], created["organizationId"]
    await report(context.bus, sandbox_id, organization, SandboxState.STARTED)
    await wait_state(client, sandbox_id, "started")
    stopping = await client.post(f"/api/sandbox/{sandbox_id}/stop?force=false")
    assert stopping.json()["state"] == "stopping"
    await report(context.bus, sandbox_id, organization, SandboxState.STOPPED)
    await wait_state(client, "machine", "stopped")
    deleting = await client.delete("/api/sandbox/machine")
    assert deleting.json()["state"] == "destroying"
    # A late `started` from an old job must not resurrect a sandbox being deleted.
    await report(context.bus, sandbox_id, organization, SandboxState.STARTED)
    # A sandbox's events apply in order: once this later `error` shows, the `started` was handled.
    await report(context.bus, sandbox_id, organization, SandboxState.ERROR)
    await wait_state(client, sandbox_id, "error")
    updates = (await client.get(f"/api/sandbox/{sandbox_id}/events")).json()
    changes = [(event.get("oldState"), event.get("newState")) for event in updates]
    assert ("destroying", "error") in changes and ("destroying", "started") not in changes
    await report(context.bus, sandbox_id, organization, SandboxState.DESTROYED)

    async def gone() -> bool:
        return (await client.get(f"/api/sandbox/{sandbox_id}")).status_code == 404

    await wait_until_async(gone, "the destroyed sandbox is still there")
    # The name is free again.
    assert (await client.post("/api/sandbox", json={"name": "machine"})).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ('{"cpu": 0}', 400, "cpu: Input should be greater than or equal to 1"),
        ('{"memory": -1}', 400, "memory: Input should be greater than or equal to 1"),
        # Daytona's per-sandbox limit: 403 (ForbiddenException), naming the organization's maximum.
        ('{"cpu": 64}', 403, "CPU request 64 exceeds maximum allowed per sandbox (4)."),
        ('{"snapshot": "nope"}', 400, "Snapshot nope not found"),
        ("{not json", 400, "not valid JSON"),
        ("[1]", 400, "JSON object"),
        ('{"labels": {"code-toolbox-language": "cobol"}}', 400, "code-toolbox-language"),
    ],
)
async def test_bad_input_is_rejected_and_nothing_is_left(api, body: str, status: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    response = await client.post("/api/sandbox", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert fragment in response.json()["message"]
    assert (await client.get("/api/sandbox")).json()["items"] == []


async def test_authentication(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    assert (await client.get("/api/sandbox", headers={"Authorization": ""})).status_code == 401
    response = await client.get("/api/sandbox", headers={"Authorization": "Bearer tp_wrong"})
    assert response.status_code == 401
    assert response.json()["message"] == "invalid API key"


async def test_keys_are_hashed_and_mirrored_for_the_proxy(api) -> None:  # type: ignore[no-untyped-def]
    _client, context, key = api
    record = await kv_get(context.api_keys_kv, hash_key(key), ApiKeyRecord)
    assert record is not None and not record.revoked
    database_file = (context.settings.data_dir / "tidepool.db").read_bytes()
    assert key.encode() not in database_file


async def test_tenants_do_not_see_each_other(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    mine = (await client.post("/api/sandbox", json={"name": "private"})).json()
    tenant = await client.post("/api/organizations", json={"name": "tenant"})
    assert tenant.status_code == 201
    other_key = tenant.json()["apiKey"]["value"]
    other = {"Authorization": f"Bearer {other_key}"}
    assert (await client.get(f"/api/sandbox/{mine['id']}", headers=other)).status_code == 404
    assert (await client.delete(f"/api/sandbox/{mine['id']}", headers=other)).status_code == 404
    assert (await client.get("/api/sandbox", headers=other)).json()["items"] == []
    assert (await client.post("/api/organizations", json={"name": "x"}, headers=other)).status_code == 403


async def test_list_pages_with_a_cursor_and_filters_labels(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    for index in range(5):
        labels = {"team": "a" if index % 2 == 0 else "b"}
        assert (
            await client.post("/api/sandbox", json={"name": f"s{index}", "labels": labels})
        ).status_code == 200
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/sandbox", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [item["name"] for item in page["items"]]
        cursor = page["nextCursor"]
        if not cursor:
            break
    assert sorted(seen) == [f"s{index}" for index in range(5)]
    team_a = (await client.get("/api/sandbox", params={"labels": '{"team": "a"}'})).json()["items"]
    assert sorted(item["name"] for item in team_a) == ["s0", "s2", "s4"]
    replaced = await client.put("/api/sandbox/s1/labels", json={"labels": {"x": "y"}})
    assert replaced.json() == {"labels": {"x": "y"}}
    assert (await client.post("/api/sandbox", json={"name": "s1"})).status_code == 409


async def test_intervals(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    created = (await client.post("/api/sandbox", json={})).json()
    assert created["autoStopInterval"] == 15 and created["autoArchiveInterval"] == 10080
    assert created["autoDeleteInterval"] == -1
    sandbox_id = created["id"]
    assert (await client.post(f"/api/sandbox/{sandbox_id}/autostop/30")).json()["autoStopInterval"] == 30
    assert (await client.post(f"/api/sandbox/{sandbox_id}/autodelete/-1")).json()["autoDeleteInterval"] == -1
    assert (await client.post(f"/api/sandbox/{sandbox_id}/autostop/-5")).status_code == 400


async def test_nothing_half_created_when_the_bus_is_down(api) -> None:  # type: ignore[no-untyped-def]
    client, context, _ = api
    # Subscribers first: FastStream's pull loop would spin on a connection closed under it (in production
    # the connection reconnects forever and is closed only at shutdown, after the subscribers stop).
    for subscriber in context.bus.broker.subscribers:
        await subscriber.stop()
    await context.bus.broker.connection.close()
    response = await client.post("/api/sandbox", json={"name": "orphan"})
    assert response.status_code == 503
    async with context.database.sessions() as session:
        from sqlmodel import select

        from tidepool_api.db import Sandbox

        assert (await session.exec(select(Sandbox).where(Sandbox.name == "orphan"))).first() is None


async def test_build_cache_evicts_only_expired_unused_builds(api) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime, timedelta

    from tidepool_api.db import Sandbox
    from tidepool_api.snapshots import evict_expired_builds
    from tidepool_contracts.models import BuildJob

    client, context, _ = api
    organization = (await client.post("/api/sandbox", json={})).json()["organizationId"]
    now = datetime.now(UTC)
    old = now - timedelta(hours=context.settings.build_cache_hours + 1)
    async with context.database.sessions() as session:
        for ref, used in (("build:expired", old), ("build:fresh", now), ("build:in-use", old)):
            session.add(
                Snapshot(
                    id=ref, name=ref, image_name=ref, ref=ref, hidden=True, state="active", last_used_at=used
                )
            )
        session.add(
            Sandbox(
                id="user-of-build",
                organization_id=organization,
                name="user-of-build",
                state="started",
                desired_state="started",
                image="build:in-use",
                build_ref="build:in-use",
                cpu=1,
                memory=1,
                disk=3,
            )
        )
        await session.commit()
    assert await evict_expired_builds(context, now) == ["build:expired"]
    async with context.database.sessions() as session:
        assert await session.get(Snapshot, "build:expired") is None
        assert await session.get(Snapshot, "build:fresh") is not None
        assert await session.get(Snapshot, "build:in-use") is not None
    message = await context.bus.jetstream.get_last_msg(subjects.JOBS_STREAM, subjects.JOB_BUILD_SUBJECT)
    job = decode(BuildJob, message.data)
    assert job.remove and job.image_ref == "build:expired"


async def test_recoverable_error_and_daemon_restarts_reach_the_sandbox(api) -> None:  # type: ignore[no-untyped-def]
    """Issue #7 item 8: what the runner's toolbox health check reports shows on the sandbox and its events."""
    client, context, _ = api
    # The API's daemon-events subscriber runs with the others (subscribers.register).
    created = (await client.post("/api/sandbox", json={"name": "wedged"})).json()
    sandbox_id, organization = created["id"], created["organizationId"]
    await report(context.bus, sandbox_id, organization, SandboxState.STARTED)
    assert (await wait_state(client, sandbox_id, "started"))["recoverable"] is False
    restarted = DaemonHealthEvent(
        sandbox_id=sandbox_id,
        organization_id=organization,
        outcome=DaemonHealthOutcome.RESTARTED,
        reason="did not answer; restarted",
    )
    await context.bus.publish(
        channels.DAEMON_EVENTS, restarted, msg_id=restarted.incident_id, sandbox_id=sandbox_id
    )
    reason = "the toolbox daemon stopped answering. Recoverable: stop and start the sandbox"
    error = SandboxStateEvent(
        sandbox_id=sandbox_id,
        organization_id=organization,
        state=SandboxState.ERROR,
        error_reason=reason,
        recoverable=True,
        source="test",
    )
    await context.bus.publish(channels.SANDBOX_EVENTS, error, sandbox_id=sandbox_id)
    errored = await wait_state(client, sandbox_id, "error")
    assert errored["recoverable"] is True and errored["errorReason"] == reason

    async def restarted_event() -> list | None:
        events = (await client.get(f"/api/sandbox/{sandbox_id}/events")).json()
        return events if any(event["type"] == "sandbox.daemon.restarted" for event in events) else None

    events = await wait_until_async(restarted_event, "no sandbox.daemon.restarted event")
    restart = next(event for event in events if event["type"] == "sandbox.daemon.restarted")
    assert restart["reason"] == "did not answer; restarted"
    states = [event for event in events if event["type"] == "sandbox.state.updated"]
    assert states[0]["newState"] == "error" and states[0]["recoverable"] is True
    # Stopping it (the recovery) clears the flag with the error.
    assert (await client.post(f"/api/sandbox/{sandbox_id}/stop")).json()["recoverable"] is False


async def test_the_build_cache_is_evicted_periodically(api) -> None:  # type: ignore[no-untyped-def]
    """The API's background loop (started in its main) evicts an expired build without being asked, and
    keeps going after a round that failed."""
    from datetime import UTC, datetime, timedelta

    from tidepool_api import snapshots

    _, context, _ = api
    old = datetime.now(UTC) - timedelta(hours=context.settings.build_cache_hours + 1)
    async with context.database.sessions() as session:
        session.add(
            Snapshot(
                id="build:stale", name="build:stale", image_name="build:stale", ref="build:stale",
                hidden=True, state="active", last_used_at=old,
            )
        )  # fmt: skip
        await session.commit()
    rounds: list[int] = []
    real_round = snapshots.evict_expired_builds

    async def first_round_fails(context_arg, now=None):  # type: ignore[no-untyped-def]
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("the database went away for a moment")
        return await real_round(context_arg, now)

    snapshots.evict_expired_builds = first_round_fails  # type: ignore[assignment]
    loop = asyncio.create_task(snapshots.evict_expired_builds_forever(context, interval_seconds=0.05))
    try:

        async def evicted() -> bool:
            async with context.database.sessions() as session:
                return await session.get(Snapshot, "build:stale") is None

        await wait_until_async(evicted, "the stale build was never evicted by the loop")
        assert len(rounds) >= 2 and not loop.done()
    finally:
        snapshots.evict_expired_builds = real_round  # type: ignore[assignment]
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
