"""Issue #9 items 4 and 6 against the real app (real nats-server, SQLite; the `api` fixture): 405 answers
name the path's methods in `Allow`; answers parse with the SDK's own models; organizations are managed by
the explicit admin organization only, and deleting one revokes its keys and deletes what it owns."""

from __future__ import annotations

import httpx
import pytest
from daytona_api_client.models.api_key_list import ApiKeyList
from daytona_api_client.models.api_key_response import ApiKeyResponse
from daytona_api_client.models.daytona_configuration import DaytonaConfiguration
from sqlmodel import select
from test_api_service import api  # noqa: F401 (the fixture, shared with the API service tests)

from tidepool_api.auth import hash_key
from tidepool_api.db import Organization, Sandbox, Snapshot
from tidepool_contracts.models import ApiKeyRecord, DesiredSandbox
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import kv_get

ALLOWED = [
    ("TRACE", "/api/sandbox", "GET, POST"),
    ("TRACE", "/api/sandbox/some-box", "DELETE, GET"),
    ("PATCH", "/api/sandbox/some-box", "DELETE, GET"),
    ("TRACE", "/api/sandbox/some-box/labels", "PUT"),
    ("GET", "/api/sandbox/some-box/start", "POST"),
    ("TRACE", "/api/organizations", "GET, POST"),
    ("TRACE", "/api/organizations/some-org", "DELETE"),
    ("PUT", "/api/health", "GET"),
    ("TRACE", "/api/docker-registry/r1", "DELETE, GET, PATCH"),
]


@pytest.mark.parametrize(("method", "path", "allow"), ALLOWED)
async def test_unsupported_method_is_405_with_allow(api, method: str, path: str, allow: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    response = await client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allow
    assert response.json()["statusCode"] == 405


async def test_answers_parse_with_the_sdk_models(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    config = await client.get("/api/config")
    assert config.status_code == 200
    DaytonaConfiguration.from_dict(config.json())
    created = await client.post("/api/api-keys", json={"name": "ci"})
    assert created.status_code == 201, created.text
    assert ApiKeyResponse.from_dict(created.json()).value.startswith("tp_")
    listed = await client.get("/api/api-keys")
    assert listed.status_code == 200
    keys = [ApiKeyList.from_dict(item) for item in listed.json()]
    assert {key.name for key in keys} == {"admin", "ci"} and all(key.value.endswith("…") for key in keys)
    # A route that answers no body documents none (no JSON schema for a 204 or an empty 201).
    spec = (await client.get("/api/openapi.json")).json()
    for path, method in (
        ("/api/organizations/{organization_id}", "delete"),
        ("/api/api-keys/{name}", "delete"),
    ):
        assert "content" not in spec["paths"][path][method]["responses"]["204"], (path, method)
    last_activity = spec["paths"]["/api/sandbox/{sandbox_id}/last-activity"]["post"]["responses"]["201"]
    assert "content" not in last_activity
    # Every JSON answer is documented with a schema, every route with its errors.
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for code, response in operation["responses"].items():
                for media, content in response.get("content", {}).items():
                    assert content.get("schema"), (path, method, code, media)
            if path not in ("/api/health", "/api/config"):
                assert "401" in operation["responses"], (path, method)


async def test_only_the_admin_manages_organizations(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    created = await client.post("/api/organizations", json={"name": "team-a"})
    assert created.status_code == 201, created.text
    tenant_key = created.json()["apiKey"]["value"]
    tenant = {"Authorization": f"Bearer {tenant_key}"}
    # Admin is a flag of the organization, not its age: a newer admin organization is admin, and the oldest
    # organization stops being admin once the flag says so.
    async with context.database.sessions() as session:
        admin = (await session.exec(select(Organization).where(Organization.is_admin))).one()
        team = await session.get(Organization, created.json()["id"])
        assert team is not None and not team.is_admin
        admin.is_admin, team.is_admin = False, True
        session.add_all([admin, team])
        await session.commit()
    assert (await client.post("/api/organizations", json={"name": "x"})).status_code == 403
    assert (await client.post("/api/organizations", json={"name": "x"}, headers=tenant)).status_code == 201
    async with context.database.sessions() as session:
        admin, team = await session.get(Organization, admin.id), await session.get(Organization, team.id)
        assert admin is not None and team is not None
        admin.is_admin, team.is_admin = True, False
        session.add_all([admin, team])
        await session.commit()
    refused = await client.delete(f"/api/organizations/{admin.id}", headers=tenant)
    assert refused.status_code == 403, refused.text
    assert (await client.delete(f"/api/organizations/{admin.id}")).status_code == 403  # never the admin's own


async def test_organization_list_is_every_one_for_the_admin_and_its_own_for_a_tenant(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    created = await client.post("/api/organizations", json={"name": "team-listed"})
    assert created.status_code == 201, created.text
    tenant_id = created.json()["id"]
    tenant = {"Authorization": f"Bearer {created.json()['apiKey']['value']}"}
    everyone = await client.get("/api/organizations")
    assert everyone.status_code == 200, everyone.text
    by_id = {item["id"]: item for item in everyone.json()}
    assert by_id[tenant_id] == {
        "id": tenant_id,
        "name": "team-listed",
        "createdAt": created.json()["createdAt"],
        "personal": False,
        "isAdmin": False,
    }
    assert [item["isAdmin"] for item in by_id.values()].count(True) == 1
    own = await client.get("/api/organizations", headers=tenant)
    assert [item["id"] for item in own.json()] == [tenant_id]
    assert (await client.delete(f"/api/organizations/{tenant_id}")).status_code == 204
    assert tenant_id not in [item["id"] for item in (await client.get("/api/organizations")).json()]


async def test_deleting_an_organization_revokes_keys_and_deletes_what_it_owns(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    created = await client.post("/api/organizations", json={"name": "team-b"})
    assert created.status_code == 201, created.text
    organization_id, key = created.json()["id"], created.json()["apiKey"]["value"]
    tenant = {"Authorization": f"Bearer {key}"}
    sandbox = await client.post("/api/sandbox", json={}, headers=tenant)
    assert sandbox.status_code == 200, sandbox.text
    snapshot = await client.post(
        "/api/snapshots", json={"name": "mine", "imageName": "alpine:3.20"}, headers=tenant
    )
    assert snapshot.status_code == 200, snapshot.text
    assert (await client.get("/api/sandbox", headers=tenant)).status_code == 200  # the key is cached now

    deleted = await client.delete(f"/api/organizations/{organization_id}")
    assert deleted.status_code == 204, deleted.text

    assert (await client.get("/api/sandbox", headers=tenant)).status_code == 401
    record = await kv_get(context.api_keys_kv, hash_key(key), ApiKeyRecord)
    assert record is not None and record.revoked  # the proxy's copy too
    desired = await kv_get(context.desired_kv, sandbox.json()["id"], DesiredSandbox)
    assert desired is not None and desired.desired_state == DesiredState.DESTROYED
    async with context.database.sessions() as session:
        row = await session.get(Sandbox, sandbox.json()["id"])
        assert row is not None and row.state == SandboxState.DESTROYING
        assert (
            await session.exec(select(Snapshot).where(Snapshot.organization_id == organization_id))
        ).all() == []
        organization = await session.get(Organization, organization_id)
        assert organization is not None and organization.deleted_at is not None
    assert (await client.delete(f"/api/organizations/{organization_id}")).status_code == 404
    assert (await client.delete("/api/organizations/no-such-org")).status_code == 404
    assert (await client.get("/api/sandbox")).status_code == 200  # the admin is untouched


async def test_unauthenticated_organization_delete_is_401(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    async with httpx.AsyncClient(transport=client._transport, base_url="http://api") as anonymous:
        assert (await anonymous.delete("/api/organizations/x")).status_code == 401


@pytest.mark.parametrize(
    "url",
    [
        "/api/sandbox/a%00b",
        "/api/sandbox?name=a%00",
        "/api/snapshots/x%00/build-logs-url",
        "/api/api-keys/%00",
    ],
)
async def test_nul_in_path_or_query_is_400(api, url: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    # PostgreSQL refuses NUL in text: without this, such an id would reach a query and be a 500 there.
    client, _, _ = api
    response = await client.get(url) if "api-keys" not in url else await client.delete(url)
    assert response.status_code == 400, response.text
    assert "NUL" in response.json()["message"]


def test_documented_answers_have_every_field_the_sdk_requires() -> None:
    """Each response model carries every field the SDK's generated model requires (nullable ones too)."""
    from daytona_api_client import models as sdk

    from tidepool_api import schemas
    from tidepool_api.routes import api_keys, registries

    pairs = [
        (schemas.SandboxDto, sdk.Sandbox),
        (schemas.ListSandboxesDto, sdk.ListSandboxesResponse),
        (schemas.SandboxLabelsDto, sdk.SandboxLabels),
        (schemas.UrlDto, sdk.ToolboxProxyUrl),
        (schemas.BuildInfoDto, sdk.BuildInfo),
        (schemas.SnapshotDto, sdk.SnapshotDto),
        (schemas.PaginatedSnapshotsDto, sdk.PaginatedSnapshots),
        (schemas.StorageAccessDto, sdk.StorageAccessDto),
        (schemas.ConfigDto, sdk.DaytonaConfiguration),
        (api_keys.ApiKeyDto, sdk.ApiKeyResponse),
        (api_keys.ApiKeyListDto, sdk.ApiKeyList),
        (registries.RegistryDto, sdk.DockerRegistry),
    ]
    for ours, theirs in pairs:
        required = {
            field.serialization_alias or field.alias or name
            for name, field in theirs.model_fields.items()
            if field.is_required()
        }
        documented = {field.alias or name for name, field in ours.model_fields.items()}
        assert required <= documented, (ours.__name__, sorted(required - documented))
