"""`GET /api/object-storage/push-access`, through the real router, error handlers and auth dependency."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import pytest
from daytona_api_client.models.storage_access_dto import StorageAccessDto
from fastapi import APIRouter, FastAPI, Request

from tidepool_api.auth import Principal
from tidepool_api.errors import ApiError, install_error_handlers
from tidepool_api.routes import object_storage
from tidepool_runtime.settings import Settings

AUTH = {"Authorization": "Bearer good-key"}
FIELDS = {"accessKey", "secret", "sessionToken", "storageUrl", "organizationId", "bucket", "region"}
CONFIGURED = Settings(
    s3_endpoint="https://localhost:9443",
    s3_secret_key="s3cr3t" * 6,
    s3_bucket="builds",
    s3_region="eu-west-3",
    s3_ca_file="/data/tls/ca.pem",
)


class FakeAuthenticator:
    async def authenticate(self, request: Request) -> Principal:
        if request.headers.get("authorization") != "Bearer good-key":
            raise ApiError(401, "missing bearer token: set DAYTONA_API_KEY")
        return Principal(organization_id="org-42", key_id="key-1", permissions=frozenset({"write:sandboxes"}))


def client_for(settings: Settings) -> httpx.AsyncClient:
    app = FastAPI()
    app.state.context = SimpleNamespace(settings=settings, authenticator=FakeAuthenticator())
    install_error_handlers(app)
    api = APIRouter(prefix="/api")
    api.include_router(object_storage.router)
    app.include_router(api)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(CONFIGURED) as http:
        yield http


async def test_push_access_returns_what_the_sdk_needs(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/object-storage/push-access", headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == FIELDS
    # No temporary-credential service issues a session token: empty, as the SDK needs the field.
    assert body.pop("sessionToken") == ""
    assert all(isinstance(value, str) and value for value in body.values())
    assert body["secret"] != CONFIGURED.s3_secret_key  # the gateway's master secret never leaves
    assert body["storageUrl"] == "https://localhost:9443"
    assert (body["organizationId"], body["bucket"], body["region"]) == ("org-42", "builds", "eu-west-3")
    # The SDK's own model accepts it (every field is required there).
    dto = StorageAccessDto.from_json(response.text)
    assert dto is not None and dto.organization_id == "org-42" and dto.storage_url == body["storageUrl"]


async def test_push_access_needs_authentication(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/object-storage/push-access")).status_code == 401
    bad = await client.get("/api/object-storage/push-access", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401


async def test_push_access_unconfigured_is_503() -> None:
    async with client_for(Settings(s3_endpoint="", s3_secret_key="")) as http:
        response = await http.get("/api/object-storage/push-access", headers=AUTH)
    assert response.status_code == 503
    body = response.json()
    assert body["statusCode"] == 503 and "TIDEPOOL_S3_ENDPOINT" in body["message"]


async def test_every_configuration_gets_a_scoped_expiring_key() -> None:
    from tidepool_runtime.object_keys import parse_key, secret_for

    scoped = CONFIGURED
    async with client_for(scoped) as http:
        body = (await http.get("/api/object-storage/push-access", headers=AUTH)).json()
    scope = parse_key(body["accessKey"], scoped.s3_secret_key)
    assert scope is not None and scope.organization_id == "org-42" and not scope.service
    assert 3500 < scope.expires_at - time.time() <= 3600
    assert body["secret"] == secret_for(scoped.s3_secret_key, body["accessKey"])
    assert body["secret"] != scoped.s3_secret_key  # the master secret never leaves the platform
