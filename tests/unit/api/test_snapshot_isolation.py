"""Snapshots of two organizations through the API alone (real nats-server, SQLite): image references an
organization may not use, per-organization build refs, and build events applied to their own snapshot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tidepool_api import subscribers as api_subscribers
from tidepool_api.app import create_app
from tidepool_api.auth import Authenticator
from tidepool_api.bootstrap import ensure_admin, mirror_api_keys
from tidepool_api.context import ApiContext
from tidepool_api.db import Database, Snapshot
from tidepool_api.events import apply_snapshot_event
from tidepool_api.migrate import migrate
from tidepool_contracts import channels, subjects
from tidepool_contracts.models import BuildJob, SnapshotEvent, SnapshotState
from tidepool_runtime.broker import connect, decode
from tidepool_runtime.settings import Settings

REGISTRY = "127.0.0.1:5999"


@pytest.fixture
async def tenants(
    nats_url: str, tmp_path: Path
) -> AsyncIterator[tuple[ApiContext, httpx.AsyncClient, httpx.AsyncClient]]:
    """The API with two tenant organizations; yields (context, client of A, client of B)."""
    settings = Settings(data_dir=tmp_path, nats_url=nats_url, database_url="", registry_url=REGISTRY)
    await migrate(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    bus = await connect(nats_url, "test-api-isolation", publishes=api_subscribers.PUBLISHES)
    context = ApiContext(
        settings=settings,
        database=database,
        bus=bus,
        desired_kv=await bus.kv(channels.DESIRED),
        api_keys_kv=await bus.kv(channels.API_KEYS),
        authenticator=Authenticator(database),
    )
    await ensure_admin(context)
    await mirror_api_keys(context)
    admin_key = (tmp_path / "admin-api-key").read_text().strip()
    transport = httpx.ASGITransport(app=create_app(context))
    clients = []
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api/api", headers={"Authorization": f"Bearer {admin_key}"}
    ) as admin:
        for name in ("tenant-a", "tenant-b"):
            created = await admin.post("/organizations", json={"name": name})
            assert created.status_code == 201, created.text
            headers = {"Authorization": f"Bearer {created.json()['apiKey']['value']}"}
            clients.append(httpx.AsyncClient(transport=transport, base_url="http://api/api", headers=headers))
    try:
        yield context, clients[0], clients[1]
    finally:
        for client in clients:
            await client.aclose()
        await bus.close()
        await database.close()


async def snapshot_row(context: ApiContext, snapshot_id: str) -> Snapshot:
    async with context.database.sessions() as session:
        row = await session.get(Snapshot, snapshot_id)
    assert row is not None
    return row


async def test_another_organizations_images_cannot_be_used(tenants) -> None:  # type: ignore[no-untyped-def]
    context, a, b = tenants
    dockerfile = "FROM python:3.12.10-slim-bookworm\nRUN echo a\n"
    built = await a.post(
        "/snapshots", json={"name": "a-built", "buildInfo": {"dockerfileContent": dockerfile}}
    )
    assert built.status_code == 200, built.text
    a_ref = built.json()["ref"]
    organization_a = built.json()["organizationId"]
    assert a_ref.startswith(f"localhost/tidepool/build/{organization_a}:")

    for image in (a_ref, f"{REGISTRY}/snapshots/tidepool/build/{organization_a}:{a_ref.rsplit(':', 1)[1]}"):
        refused = await b.post("/snapshots", json={"name": "steal", "imageName": image})
        assert refused.status_code in (400, 404), refused.text
        assert image in refused.json()["message"]
        from_line = await b.post(
            "/snapshots", json={"name": "steal-from", "buildInfo": {"dockerfileContent": f"FROM {image}\n"}}
        )
        assert from_line.status_code in (400, 404), from_line.text
        sandbox = await b.post("/sandbox", json={"buildInfo": {"dockerfileContent": f"FROM {image}\n"}})
        assert sandbox.status_code in (400, 404), sandbox.text
    assert (await b.post("/snapshots", json={"name": "x", "imageName": a_ref})).status_code == 404
    listed = (await b.get("/snapshots")).json()["items"]
    assert all(item["name"] not in ("steal", "steal-from") for item in listed)

    # Its own build and the platform's default image stay usable.
    own = await a.post("/snapshots", json={"name": "a-again", "imageName": a_ref})
    assert own.status_code == 200, own.text
    default_image = context.settings.default_image
    platform = await b.post("/snapshots", json={"name": "b-default", "imageName": default_image})
    assert platform.status_code == 200, platform.text


async def test_identical_builds_get_one_ref_per_organization(tenants) -> None:  # type: ignore[no-untyped-def]
    context, a, b = tenants
    dockerfile = "FROM python:3.12.10-slim-bookworm\n"
    body = {"buildInfo": {"dockerfileContent": dockerfile, "contextHashes": ["c" * 32]}}
    made_a = await a.post("/snapshots", json={"name": "same", **body})
    made_b = await b.post("/snapshots", json={"name": "same", **body})
    assert made_a.status_code == made_b.status_code == 200
    assert made_a.json()["ref"] != made_b.json()["ref"]
    job = decode(
        BuildJob,
        (await context.bus.jetstream.get_last_msg(subjects.JOBS_STREAM, subjects.JOB_BUILD_SUBJECT)).data,
    )
    assert (job.snapshot_id, job.organization_id) == (made_b.json()["id"], made_b.json()["organizationId"])
    assert job.image_ref == made_b.json()["ref"]


async def test_build_events_change_only_their_own_snapshot(tenants) -> None:  # type: ignore[no-untyped-def]
    context, a, b = tenants
    image = "python:3.12.10-slim-bookworm"
    snap_a = (await a.post("/snapshots", json={"name": "py", "imageName": image})).json()
    snap_b = (await b.post("/snapshots", json={"name": "py", "imageName": image})).json()
    assert snap_a["ref"] != snap_b["ref"], "each registration has its own local image"
    active = SnapshotEvent(
        snapshot_id=snap_a["id"], snapshot_name="py", image_ref=snap_a["ref"], state=SnapshotState.ACTIVE
    )
    await apply_snapshot_event(context, active)
    before = await snapshot_row(context, snap_a["id"])
    assert before.state == "active"

    # B's registration of the same image goes through pulling (and may fail): A's snapshot is untouched.
    for state in (SnapshotState.PULLING, SnapshotState.ERROR):
        event = SnapshotEvent(
            snapshot_id=snap_b["id"],
            snapshot_name="py",
            image_ref=snap_b["ref"],
            state=state,
            error_reason="pull failed",
        )
        await apply_snapshot_event(context, event)
        after = await snapshot_row(context, snap_a["id"])
        assert (after.state, after.updated_at, after.error_reason) == ("active", before.updated_at, None)
        assert (await snapshot_row(context, snap_b["id"])).state == state.value
    # An event naming A's image ref but B's snapshot (or an unknown one) changes nothing of A's.
    for snapshot_id in (snap_b["id"], "no-such-snapshot"):
        forged = SnapshotEvent(
            snapshot_id=snapshot_id, snapshot_name="py", image_ref=snap_a["ref"], state=SnapshotState.PULLING
        )
        await apply_snapshot_event(context, forged)
        assert (await snapshot_row(context, snap_a["id"])).state == "active"
