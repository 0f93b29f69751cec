"""Issue #13 through REST against the real FastAPI app, SQLite and nats-server (the `api` fixture), with the
object storage replaced by no-ops (the SDK tests use the real one): the per-organization limit, names
unique among live volumes and free again after deletion, deleted volumes out of the list, 409 while a
sandbox mounts it, and the mount reaching the desired state the scheduler reads."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_api_service import api  # noqa: F401 (the fixture, shared with the API service tests)

from tidepool_api import volumes
from tidepool_api.context import ApiContext
from tidepool_contracts import channels
from tidepool_contracts.models import DesiredSandbox
from tidepool_runtime.broker import kv_get

Api = tuple[httpx.AsyncClient, ApiContext, str]


@pytest.fixture
def no_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volumes, "require_storage", lambda _settings: None)
    monkeypatch.setattr(volumes, "create_storage", lambda *_args: None)
    monkeypatch.setattr(volumes, "delete_storage", lambda *_args: None)


async def create(client: httpx.AsyncClient, name: str) -> httpx.Response:
    return await client.post("/api/volumes", json={"name": name})


@pytest.mark.usefixtures("no_storage")
async def test_limit_names_and_deletion(api: Api) -> None:  # noqa: F811
    client, context, _ = api
    object.__setattr__(context.settings, "volume_limit_per_organization", 2)
    first = (await create(client, "one")).json()
    assert first["state"] == "ready" and first["errorReason"] is None
    duplicate = await create(client, "one")
    assert duplicate.status_code == 400 and "already exists" in duplicate.json()["message"]
    assert (await create(client, "two")).status_code == 200
    over = await create(client, "three")
    assert over.status_code == 400 and "Volume quota exceeded" in over.json()["message"]
    deleted = await client.delete(f"/api/volumes/{first['id']}")
    assert deleted.status_code == 200
    names = [item["name"] for item in (await client.get("/api/volumes")).json()]
    assert names == ["two"]
    everything = (await client.get("/api/volumes", params={"includeDeleted": "true"})).json()
    assert {item["state"] for item in everything} == {"ready", "deleted"}
    assert (await client.get("/api/volumes/by-name/one")).status_code == 404
    assert (await client.get(f"/api/volumes/{first['id']}")).json()["state"] == "deleted"
    again = await create(client, "one")
    assert again.status_code == 200 and again.json()["id"] != first["id"]


@pytest.mark.usefixtures("no_storage")
async def test_a_mounted_volume_cannot_be_deleted_and_the_mount_reaches_the_scheduler(api: Api) -> None:  # noqa: F811
    client, context, _ = api
    volume = (await create(client, "data")).json()
    body: dict[str, Any] = {"volumes": [{"volumeId": "data", "mountPath": "/data/", "subpath": "team/a/"}]}
    sandbox = (await client.post("/api/sandbox", json=body)).json()
    assert sandbox["volumes"] == [{"volumeId": volume["id"], "mountPath": "/data", "subpath": "team/a"}]
    desired = await kv_get(await context.bus.kv(channels.DESIRED), sandbox["id"], DesiredSandbox)
    assert desired is not None
    mount = desired.spec.volumes[0]
    assert (mount.volume_id, mount.mount_path, mount.subpath) == (volume["id"], "/data", "team/a")
    assert mount.key_prefix == f"volumes/{volume['id']}"
    in_use = await client.delete(f"/api/volumes/{volume['id']}")
    assert in_use.status_code == 409 and sandbox["id"] in in_use.json()["message"]
    assert (await client.get(f"/api/volumes/{volume['id']}")).json()["state"] == "ready"
    assert (await client.get(f"/api/volumes/{volume['id']}")).json()["lastUsedAt"] is not None
