"""Signing keys for signed file URLs: lazily created, rotated, organization-scoped, mirrored to KV."""

from __future__ import annotations

import asyncio

from sqlmodel import select
from test_api_service import api  # noqa: F401 (the fixture, shared with the API service tests)

from tidepool_api.db import Sandbox
from tidepool_contracts import channels
from tidepool_contracts.models import SigningKeyRecord
from tidepool_runtime.broker import kv_delete, kv_get, kv_put


async def test_signing_key_is_created_once_and_mirrored(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    sandbox = (await client.post("/api/sandbox", json={"name": "signed"})).json()
    sandbox_id = sandbox["id"]

    first, second = await asyncio.gather(
        client.get(f"/api/sandbox/{sandbox_id}/signing-key"),
        client.get(f"/api/sandbox/{sandbox_id}/signing-key"),
    )
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    key = first.json()
    assert isinstance(key, str) and len(key) >= 43, "32 random bytes, url-safe base64"
    assert second.json() == key, "concurrent first calls agree on one key"
    assert (await client.get(f"/api/sandbox/{sandbox_id}/signing-key")).json() == key

    async with context.database.sessions() as session:
        row = (await session.exec(select(Sandbox).where(Sandbox.id == sandbox_id))).one()
    assert row.signing_key == key, "the database is the source of truth"
    kv = await context.bus.kv(channels.SIGNING_KEYS)
    record = await kv_get(kv, sandbox_id, SigningKeyRecord)
    assert record is not None and record.key != key, "the mirror holds the key sealed, never in clear"
    assert context.signing_sealer.open(record.key) == key
    assert record.organization_id == sandbox["organizationId"] and record.sandbox_id == sandbox_id

    # A lost mirror entry is repaired by the next read.
    await kv_delete(kv, sandbox_id)
    assert (await client.get(f"/api/sandbox/{sandbox_id}/signing-key")).json() == key
    repaired = await kv_get(kv, sandbox_id, SigningKeyRecord)
    assert repaired is not None and context.signing_sealer.open(repaired.key) == key
    # So is an entry in clear (an older mirror, or planted by a bus client without the sealing key).
    await kv_put(kv, sandbox_id, SigningKeyRecord(sandbox_id=sandbox_id, organization_id="o", key=key))
    assert (await client.get(f"/api/sandbox/{sandbox_id}/signing-key")).json() == key
    resealed = await kv_get(kv, sandbox_id, SigningKeyRecord)
    assert resealed is not None and context.signing_sealer.open(resealed.key) == key


async def test_rotate_replaces_the_key(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    sandbox_id = (await client.post("/api/sandbox", json={"name": "rotating"})).json()["id"]
    old = (await client.get(f"/api/sandbox/{sandbox_id}/signing-key")).json()
    rotated = await client.post(f"/api/sandbox/{sandbox_id}/signing-key/rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()
    assert isinstance(new, str) and new != old
    assert (await client.get(f"/api/sandbox/{sandbox_id}/signing-key")).json() == new
    record = await kv_get(await context.bus.kv(channels.SIGNING_KEYS), sandbox_id, SigningKeyRecord)
    assert record is not None and context.signing_sealer.open(record.key) == new
    # Rotating without any earlier key also works (and by name, like every sandbox path).
    fresh_id = (await client.post("/api/sandbox", json={"name": "never-read"})).json()["id"]
    assert (await client.post("/api/sandbox/never-read/signing-key/rotate")).status_code == 200
    assert (await client.get(f"/api/sandbox/{fresh_id}/signing-key")).status_code == 200


async def test_signing_key_is_organization_scoped(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    sandbox_id = (await client.post("/api/sandbox", json={"name": "mine-signed"})).json()["id"]
    tenant = await client.post("/api/organizations", json={"name": "signing-tenant"})
    other = {"Authorization": f"Bearer {tenant.json()['apiKey']['value']}"}
    assert (await client.get(f"/api/sandbox/{sandbox_id}/signing-key", headers=other)).status_code == 404
    rotate = await client.post(f"/api/sandbox/{sandbox_id}/signing-key/rotate", headers=other)
    assert rotate.status_code == 404
    assert (await client.get("/api/sandbox/does-not-exist/signing-key")).status_code == 404
    bad_key = {"Authorization": "Bearer not-a-key"}
    assert (await client.get(f"/api/sandbox/{sandbox_id}/signing-key", headers=bad_key)).status_code == 401
    # Nothing was created by the refused calls.
    record = await kv_get(await context.bus.kv(channels.SIGNING_KEYS), sandbox_id, SigningKeyRecord)
    assert record is None
