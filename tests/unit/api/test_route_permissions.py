"""API-key scopes on the API's routes: the table of what each route needs (as Daytona's
`@RequiredOrganizationResourcePermissions`), the 403 the check answers, and the permission helpers.

The table is read off the routes themselves (`Requires(...)` in their signatures), so a route that changes
its scope, or a new write route that declares none, fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request

from tidepool_api.app import create_app
from tidepool_api.auth import Principal
from tidepool_api.errors import ApiError, install_error_handlers
from tidepool_api.routes.deps import (
    Caller,
    Requires,
    SandboxWriter,
    api_routes,
    document_permissions,
    permission_checks,
)
from tidepool_contracts.permissions import (
    ALL_PERMISSIONS,
    TOOLBOX_PERMISSION,
    Permission,
    missing,
    normalized,
)

ANY_KEY: tuple[str, ...] = ()  # a read: any valid key of the organization
EVERY = tuple(ALL_PERMISSIONS)

# (method, path) -> the permissions its key must hold (all of them; `any:` prefixed for one-of).
EXPECTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("GET", "/api/health"): ANY_KEY,
    ("GET", "/api/config"): ANY_KEY,
    ("POST", "/api/sandbox"): ("write:sandboxes",),
    ("GET", "/api/sandbox"): ANY_KEY,
    ("GET", "/api/sandbox/{sandbox_id_or_name}"): ANY_KEY,
    ("DELETE", "/api/sandbox/{sandbox_id_or_name}"): ("delete:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/start"): ("write:sandboxes",),
    # Preview tokens and signed preview URLs open the sandbox's ports, as the toolbox does.
    ("GET", "/api/sandbox/{sandbox_id_or_name}/ports/{port}/preview-url"): ("write:sandboxes",),
    ("GET", "/api/sandbox/{sandbox_id_or_name}/ports/{port}/signed-preview-url"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/ports/{port}/signed-preview-url/{token}/expire"): (
        "write:sandboxes",
    ),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/public/{is_public}"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/archive"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/snapshot"): ("write:sandboxes", "write:snapshots"),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/fork"): ("write:sandboxes",),
    ("GET", "/api/sandbox/{sandbox_id_or_name}/forks"): ANY_KEY,
    ("GET", "/api/sandbox/{sandbox_id_or_name}/parent"): ANY_KEY,
    # An SSH token opens a shell in the sandbox, as the toolbox does.
    ("POST", "/api/sandbox/{sandbox_id_or_name}/ssh-access"): ("write:sandboxes",),
    ("DELETE", "/api/sandbox/{sandbox_id_or_name}/ssh-access"): ("write:sandboxes",),
    ("GET", "/api/sandbox/ssh-access/validate"): ANY_KEY,
    ("GET", "/api/volumes"): ("read:volumes",),
    ("POST", "/api/volumes"): ("write:volumes",),
    ("GET", "/api/volumes/by-name/{name}"): ("read:volumes",),
    ("GET", "/api/volumes/{volume_id}"): ("read:volumes",),
    ("DELETE", "/api/volumes/{volume_id}"): ("delete:volumes",),
    ("GET", "/api/warm-pools"): ANY_KEY,
    ("POST", "/api/warm-pools"): ("write:snapshots",),
    ("PATCH", "/api/warm-pools/{warm_pool_id}"): ("write:snapshots",),
    ("DELETE", "/api/warm-pools/{warm_pool_id}"): ("delete:snapshots",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/stop"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/recover"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/resize"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/network-settings"): ("write:sandboxes",),
    ("PUT", "/api/sandbox/{sandbox_id_or_name}/labels"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id_or_name}/{kind}/{minutes}"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id}/last-activity"): ("write:sandboxes",),
    ("GET", "/api/sandbox/{sandbox_id_or_name}/toolbox-proxy-url"): ANY_KEY,
    ("GET", "/api/sandbox/{sandbox_id_or_name}/build-logs-url"): ANY_KEY,
    ("GET", "/api/sandbox/{sandbox_id_or_name}/build-logs"): ANY_KEY,
    ("GET", "/api/sandbox/{sandbox_id_or_name}/events"): ANY_KEY,
    ("GET", "/api/sandbox/{sandbox_id_or_name}/telemetry/metrics"): ANY_KEY,
    ("GET", "/api/sandbox/{sandbox_id_or_name}/network/flows"): ANY_KEY,
    # The signing key makes toolbox file URLs: it needs what the toolbox needs.
    ("GET", "/api/sandbox/{sandbox_id}/signing-key"): ("write:sandboxes",),
    ("POST", "/api/sandbox/{sandbox_id}/signing-key/rotate"): ("write:sandboxes",),
    ("GET", "/api/snapshots"): ANY_KEY,
    ("POST", "/api/snapshots"): ("write:snapshots",),
    ("GET", "/api/snapshots/{id_or_name:path}"): ANY_KEY,
    ("GET", "/api/snapshots/{id_or_name:path}/build-logs-url"): ANY_KEY,
    ("GET", "/api/snapshots/{id_or_name:path}/build-logs"): ANY_KEY,
    ("POST", "/api/snapshots/{id_or_name:path}/activate"): ("write:snapshots",),
    ("POST", "/api/snapshots/{id_or_name:path}/deactivate"): ("write:snapshots",),
    ("DELETE", "/api/snapshots/{id_or_name:path}"): ("delete:snapshots",),
    ("GET", "/api/docker-registry"): ANY_KEY,
    ("GET", "/api/docker-registry/{registry_id}"): ANY_KEY,
    ("POST", "/api/docker-registry"): ("write:registries",),
    ("PATCH", "/api/docker-registry/{registry_id}"): ("write:registries",),
    ("DELETE", "/api/docker-registry/{registry_id}"): ("delete:registries",),
    # A build context serves sandboxes made from an Image and snapshot builds alike.
    ("GET", "/api/object-storage/push-access"): ("any:write:sandboxes", "any:write:snapshots"),
    # The organizations a key sees (every one for the admin organization's, else its own): any key.
    ("GET", "/api/organizations"): ANY_KEY,
    # Organizations mint full-access keys: only a full-access key (of the admin organization) may.
    ("POST", "/api/organizations"): EVERY,
    ("DELETE", "/api/organizations/{organization_id}"): EVERY,
    # An organization's OTLP destination: its headers hold the destination's API key.
    ("GET", "/api/organizations/{organization_id}/otel-config"): EVERY,
    ("PUT", "/api/organizations/{organization_id}/otel-config"): EVERY,
    ("DELETE", "/api/organizations/{organization_id}/otel-config"): EVERY,
    # Quotas and rate limits are the admin's to set (a full-access key of the admin organization).
    ("PATCH", "/api/organizations/{organization_id}/quota"): EVERY,
    # An organization's own usage: any of its keys (404 for another organization's, unless the admin's).
    ("GET", "/api/organizations/{organization_id}/usage"): ANY_KEY,
    # Keys: checked against the caller's own scopes in the handler (never broader than itself).
    ("GET", "/api/api-keys"): ANY_KEY,
    ("POST", "/api/api-keys"): ANY_KEY,
    ("GET", "/api/api-keys/current"): ANY_KEY,
    ("GET", "/api/api-keys/{name}"): ANY_KEY,
    ("DELETE", "/api/api-keys/{name}"): ANY_KEY,
    ("DELETE", "/api/api-keys/{user_id}/{name}"): ANY_KEY,
    ("GET", "/api/audit/organizations/{organization_id}"): ("read:audit_logs",),
    ("GET", "/api/audit-logs"): ("read:audit_logs",),
    # Webhook endpoints receive every event of the organization and hold its signing secret: the
    # organization's owners (a full-access key), as Daytona's webhook pages give them to admins.
    ("GET", "/api/webhooks/endpoints"): EVERY,
    ("POST", "/api/webhooks/endpoints"): EVERY,
    ("GET", "/api/webhooks/endpoints/{endpoint_id}"): EVERY,
    ("PATCH", "/api/webhooks/endpoints/{endpoint_id}"): EVERY,
    ("DELETE", "/api/webhooks/endpoints/{endpoint_id}"): EVERY,
    ("POST", "/api/webhooks/endpoints/{endpoint_id}/rotate-secret"): EVERY,
    ("GET", "/api/webhooks/endpoints/{endpoint_id}/attempts"): EVERY,
    ("GET", "/api/webhooks/endpoints/{endpoint_id}/deliveries"): EVERY,
    # Runners: the admin organization's only (404 for others, checked in the handler).
    ("GET", "/api/runners"): ("read:runners",),
    ("GET", "/api/runners/{runner_id}"): ("read:runners",),
    ("POST", "/api/runners/{runner_id}/cordon"): ("write:runners",),
    ("POST", "/api/runners/{runner_id}/drain"): ("write:runners",),
    ("POST", "/api/runners/{runner_id}/uncordon"): ("write:runners",),
    ("PATCH", "/api/runners/{runner_id}/scheduling"): ("write:runners",),
    ("PATCH", "/api/runners/{runner_id}/draining"): ("write:runners",),
}
# Writes that check scopes in the handler rather than by a declared `Requires`.
CHECKED_IN_HANDLER = {
    ("POST", "/api/api-keys"),
    ("DELETE", "/api/api-keys/{name}"),
    ("DELETE", "/api/api-keys/{user_id}/{name}"),
}


def app() -> FastAPI:
    return create_app(SimpleNamespace(settings=SimpleNamespace(api_max_body_bytes=1024)))  # type: ignore[arg-type]


def declared(route: object) -> tuple[str, ...]:
    needs: list[str] = []
    for check in permission_checks(route):  # type: ignore[arg-type]
        needs.extend(f"any:{p}" if check.any_of else p for p in check.permissions)
    return tuple(needs)


def routes_table() -> dict[tuple[str, str], tuple[str, ...]]:
    return {
        (method, path): declared(route)
        for path, route in api_routes(app().routes)
        for method in route.methods
    }


def test_each_route_declares_the_scope_daytona_requires() -> None:
    table = routes_table()
    assert {key: table.get(key) for key in EXPECTED} == EXPECTED
    # Other helpers add routes (volumes, previews, ...): each must be in this table with its scope.
    assert set(table) - set(EXPECTED) == set(), "new routes: add them (and their scope) to EXPECTED"


def test_every_write_route_declares_a_scope() -> None:
    undeclared = [
        key
        for key, needs in routes_table().items()
        if key[0] != "GET" and not needs and key not in CHECKED_IN_HANDLER
    ]
    assert undeclared == []


def test_openapi_documents_the_403_and_the_scope() -> None:
    schema = app().openapi()
    operation = schema["paths"]["/api/sandbox/{sandbox_id_or_name}"]["delete"]
    assert "403" in operation["responses"]
    assert "delete:sandboxes" in operation["description"]
    assert "403" not in schema["paths"]["/api/sandbox/{sandbox_id_or_name}"]["get"]["responses"]


def test_toolbox_needs_write_sandboxes() -> None:
    assert TOOLBOX_PERMISSION == "write:sandboxes"


def test_permission_names_are_the_sdks() -> None:
    """The 15 scopes of Daytona's OrganizationResourcePermission (design digest §7), nothing else."""
    assert set(ALL_PERMISSIONS) == {
        "write:registries", "delete:registries", "write:snapshots", "delete:snapshots", "write:sandboxes",
        "delete:sandboxes", "read:volumes", "write:volumes", "delete:volumes", "write:regions",
        "delete:regions", "read:runners", "write:runners", "delete:runners", "read:audit_logs",
    }  # fmt: skip
    assert not any(p in ALL_PERMISSIONS for p in ("read:sandboxes", "read:snapshots", "read:registries"))


def test_permission_helpers() -> None:
    assert normalized(["write:sandboxes", "write:registries", "write:sandboxes"]) == [
        "write:registries",
        "write:sandboxes",
    ]
    with pytest.raises(ValueError):
        normalized(["write:everything"])
    assert missing({"write:sandboxes"}, ["write:sandboxes", "delete:sandboxes"]) == ["delete:sandboxes"]
    assert missing(ALL_PERMISSIONS, ALL_PERMISSIONS) == []


# ----- the check itself, through FastAPI ------------------------------------------------------------------


class KeyTable:
    """Bearer token -> the key's scopes."""

    keys = {
        "reader": frozenset[str](),
        "writer": frozenset({"write:sandboxes"}),
        "snapshots": frozenset({"write:snapshots"}),
    }

    async def authenticate(self, request: Request) -> Principal:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.keys:
            raise ApiError(401, "invalid API key")
        return Principal(organization_id="org", key_id=token, key_name=token, permissions=self.keys[token])


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    test_app = FastAPI()
    test_app.state.context = SimpleNamespace(authenticator=KeyTable())
    install_error_handlers(test_app)
    router = APIRouter()

    @router.get("/read")
    async def read(caller: Caller) -> str:
        return caller.key_id

    @router.post("/write")
    async def write(caller: SandboxWriter) -> str:
        return caller.key_id

    @router.post("/either")
    async def either(
        caller: Annotated[
            Principal, Requires(Permission.WRITE_SANDBOXES, Permission.WRITE_SNAPSHOTS, any_of=True)
        ],
    ) -> str:
        return caller.key_id

    test_app.include_router(router, prefix="/api")
    document_permissions(test_app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=test_app), base_url="http://api") as http:
        yield http


async def call(client: httpx.AsyncClient, method: str, path: str, token: str) -> httpx.Response:
    return await client.request(method, path, headers={"Authorization": f"Bearer {token}"})


async def test_the_check_answers_403_naming_the_missing_scope(client: httpx.AsyncClient) -> None:
    assert (await call(client, "GET", "/api/read", "reader")).status_code == 200
    refused = await call(client, "POST", "/api/write", "reader")
    assert refused.status_code == 403
    assert "write:sandboxes" in refused.json()["message"] and "'reader'" in refused.json()["message"]
    assert (await call(client, "POST", "/api/write", "writer")).json() == "writer"
    assert (await call(client, "POST", "/api/write", "snapshots")).status_code == 403
    # one of:
    assert (await call(client, "POST", "/api/either", "writer")).status_code == 200
    assert (await call(client, "POST", "/api/either", "snapshots")).status_code == 200
    either = await call(client, "POST", "/api/either", "reader")
    assert either.status_code == 403 and "write:sandboxes or write:snapshots" in either.json()["message"]
    # Authentication comes first: an unknown key is 401, never 403.
    assert (await call(client, "POST", "/api/write", "nobody")).status_code == 401


def test_requires_needs_a_permission() -> None:
    with pytest.raises(ValueError):
        Requires()
