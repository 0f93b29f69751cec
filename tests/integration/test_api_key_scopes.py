"""Issue #12, API keys: scopes enforced by the API and the toolbox proxy, expiry, masking, `current`.

Against a real stack, in a tenant organization of its own: keys are made over HTTP (key management is not
in the SDK), then used through the official SDK as a user would (`Daytona(DaytonaConfig(api_key=...))`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from daytona import (
    Daytona,
    DaytonaAuthenticationError,
    DaytonaConfig,
    DaytonaError,
    DaytonaForbiddenError,
)
from daytona_api_client.models.api_key_list import ApiKeyList
from daytona_api_client.models.api_key_response import ApiKeyResponse
from daytona_api_client.models.paginated_audit_logs import PaginatedAuditLogs

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Tenant:
    """An organization of this test's own, and its first (full-access) key."""

    def __init__(self, stack: StackThread) -> None:
        self.stack = stack
        created = httpx.post(
            f"{stack.api_url}/organizations",
            json={"name": f"scopes-{uuid.uuid4().hex[:6]}"},
            headers=bearer(stack.api_key),
        )
        assert created.status_code == 201, created.text
        self.id: str = created.json()["id"]
        self.key: str = created.json()["apiKey"]["value"]

    def call(self, method: str, path: str, key: str) -> httpx.Response:
        return httpx.request(method, f"{self.stack.api_url}{path}", headers=bearer(key))

    def make_key(
        self, name: str, permissions: list[str] | None, *, by: str | None = None, **extra: object
    ) -> httpx.Response:
        body: dict[str, object] = {"name": name, **extra}
        if permissions is not None:
            body["permissions"] = permissions
        return httpx.post(f"{self.stack.api_url}/api-keys", json=body, headers=bearer(by or self.key))

    def new_key(self, name: str, permissions: list[str] | None, **extra: object) -> str:
        created = self.make_key(name, permissions, **extra)
        assert created.status_code == 201, created.text
        return ApiKeyResponse.from_dict(created.json()).value

    def sdk(self, key: str) -> Daytona:
        return Daytona(DaytonaConfig(api_key=key, api_url=self.stack.api_url))


@pytest.fixture
def tenant(stack: StackThread) -> Iterator[Tenant]:
    made = Tenant(stack)
    yield made
    # Everything the test made goes with the organization (sandboxes through the runners).
    httpx.delete(f"{stack.api_url}/organizations/{made.id}", headers=bearer(stack.api_key))


def test_write_key_creates_and_uses_but_cannot_delete(tenant: Tenant) -> None:
    writer = tenant.sdk(tenant.new_key("writer", ["write:sandboxes"]))
    sandbox = writer.create()
    assert sandbox.state == "started"
    # The toolbox (through the proxy) takes write:sandboxes, as Daytona's toolbox does.
    assert sandbox.process.exec("echo scoped").result.strip() == "scoped"
    sandbox.stop()
    sandbox.start()
    with pytest.raises(DaytonaForbiddenError, match="delete:sandboxes"):
        writer.delete(sandbox)
    assert writer.get(sandbox.id).state == "started"
    # A key with delete:sandboxes (and nothing else) can.
    deleter = tenant.sdk(tenant.new_key("deleter", ["delete:sandboxes"]))
    deleter.delete(deleter.get(sandbox.id))


def test_read_only_key_lists_but_cannot_create_nor_use_the_toolbox(tenant: Tenant) -> None:
    full = tenant.sdk(tenant.new_key("full", None))  # omitted: the caller's own (here every) permission
    sandbox = full.create()
    reader_key = tenant.new_key("reader", [])
    reader = tenant.sdk(reader_key)
    assert sandbox.id in [item.id for item in reader.list()]
    assert reader.get(sandbox.id).state == "started"
    with pytest.raises(DaytonaForbiddenError, match="write:sandboxes"):
        reader.create()
    with pytest.raises(DaytonaForbiddenError):
        reader.get(sandbox.id).stop()
    # Through the proxy: the key's scopes travel in its KV record.
    with pytest.raises(DaytonaError) as refused:
        reader.get(sandbox.id).process.exec("echo no")
    assert refused.value.status_code == 403
    direct = httpx.get(f"{tenant.stack.proxy_url}/toolbox/{sandbox.id}/version", headers=bearer(reader_key))
    assert direct.status_code == 403 and "write:sandboxes" in direct.text
    # Snapshots and registries have their own scopes.
    assert (
        httpx.post(
            f"{tenant.stack.api_url}/docker-registry",
            json={"name": "r", "url": "registry.example.com", "username": "u", "password": "p"},
            headers=bearer(reader_key),
        ).status_code
        == 403
    )
    assert (
        httpx.delete(
            f"{tenant.stack.api_url}/snapshots/{uuid.uuid4()}", headers=bearer(reader_key)
        ).status_code
        == 403
    )
    full.delete(sandbox)


def test_expired_and_revoked_keys_are_refused(tenant: Tenant) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=3)
    short_key = tenant.new_key("short", [], expiresAt=expires.isoformat())
    short = tenant.sdk(short_key)
    assert list(short.list()) == []
    wait_until(
        lambda: tenant.call("GET", "/sandbox", short_key).status_code == 401,
        "the expired key is still accepted",
    )
    with pytest.raises(DaytonaAuthenticationError):
        list(short.list())
    # A past expiry is refused at creation.
    assert tenant.make_key("past", [], expiresAt="2020-01-01T00:00:00Z").status_code == 400
    # Revoked: refused at once.
    gone_key = tenant.new_key("gone", [])
    assert tenant.call("DELETE", "/api-keys/gone", tenant.key).status_code == 204
    assert tenant.call("GET", "/sandbox", gone_key).status_code == 401


def test_current_get_and_masked_list(tenant: Tenant) -> None:
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    created = tenant.make_key("ci", ["write:sandboxes", "read:volumes"], expiresAt=expires.isoformat())
    assert created.status_code == 201, created.text
    shown = ApiKeyResponse.from_dict(created.json())
    assert shown.permissions == ["write:sandboxes", "read:volumes"]
    assert shown.expires_at == expires

    current = tenant.call("GET", "/api-keys/current", shown.value)
    assert current.status_code == 200, current.text
    mine = ApiKeyList.from_dict(current.json())
    assert (mine.name, mine.permissions, mine.organization_id) == (
        "ci", ["write:sandboxes", "read:volumes"], tenant.id,
    )  # fmt: skip
    assert mine.last_used_at is not None  # this very request
    assert mine.value != shown.value and mine.value.endswith("…") and shown.value.startswith(mine.value[:-1])

    listed = tenant.call("GET", "/api-keys", tenant.key)
    assert listed.status_code == 200, listed.text
    keys = {item.name: item for item in (ApiKeyList.from_dict(entry) for entry in listed.json())}
    assert set(keys) == {"default", "ci"}
    assert all(tenant.key not in entry.value and shown.value not in entry.value for entry in keys.values())
    assert keys["ci"].permissions == ["write:sandboxes", "read:volumes"]
    assert len(keys["default"].permissions) == 15  # the organization's first key holds every scope

    by_name = tenant.call("GET", "/api-keys/ci", tenant.key)
    assert by_name.status_code == 200 and by_name.json() == current.json()
    assert tenant.call("GET", "/api-keys/nope", tenant.key).status_code == 404
    # Delete for a user: in Tidepool the user is the organization; another id names nothing.
    other = tenant.call("DELETE", f"/api-keys/{uuid.uuid4()}/ci", tenant.key)
    assert other.status_code == 404
    deleted = tenant.call("DELETE", f"/api-keys/{tenant.id}/ci", tenant.key)
    assert deleted.status_code == 204
    assert tenant.call("GET", "/api-keys/current", shown.value).status_code == 401


def test_a_key_never_mints_nor_revokes_a_broader_key(tenant: Tenant) -> None:
    writer_key = tenant.new_key("writer", ["write:sandboxes"])
    broader = tenant.make_key("broader", ["write:sandboxes", "delete:sandboxes"], by=writer_key)
    assert broader.status_code == 403 and "delete:sandboxes" in broader.json()["message"]
    # As narrow or narrower is fine; an omitted list copies the caller's.
    assert tenant.make_key("same", ["write:sandboxes"], by=writer_key).status_code == 201
    assert tenant.make_key("less", [], by=writer_key).status_code == 201
    copied = tenant.make_key("copy", None, by=writer_key)
    assert copied.status_code == 201 and copied.json()["permissions"] == ["write:sandboxes"]
    # Unknown scopes are invalid input.
    assert tenant.make_key("odd", ["write:everything"]).status_code == 400
    # Nor can it revoke a broader key, or manage organizations.
    refused = tenant.call("DELETE", "/api-keys/default", writer_key)
    assert refused.status_code == 403
    assert tenant.call("GET", "/api-keys/current", tenant.key).status_code == 200
    assert tenant.call("DELETE", "/api-keys/less", writer_key).status_code == 204
    organizations = httpx.post(
        f"{tenant.stack.api_url}/organizations", json={"name": "x"}, headers=bearer(writer_key)
    )
    assert organizations.status_code == 403


def test_other_organizations_resources_stay_404_for_a_scoped_key(tenant: Tenant, stack: StackThread) -> None:
    other = Tenant(stack)
    try:
        theirs = other.sdk(other.key).create()
        key = tenant.new_key("mine", ["write:sandboxes", "delete:sandboxes"])
        with pytest.raises(DaytonaError) as hidden:
            tenant.sdk(key).get(theirs.id)
        assert hidden.value.status_code == 404
        # (A Sandbox object keeps the client that made it: the delete goes over HTTP with this key.)
        assert tenant.call("DELETE", f"/sandbox/{theirs.id}", key).status_code == 404
        assert tenant.call("POST", f"/sandbox/{theirs.id}/stop", key).status_code == 404
        toolbox = httpx.get(f"{stack.proxy_url}/toolbox/{theirs.id}/version", headers=bearer(key))
        assert toolbox.status_code == 404
        assert other.sdk(other.key).get(theirs.id).state == "started"
    finally:
        httpx.delete(f"{stack.api_url}/organizations/{other.id}", headers=bearer(stack.api_key))


def test_audit_log_records_who_did_what(tenant: Tenant) -> None:
    writer_key = tenant.new_key("registrar", ["write:registries", "delete:registries"])
    created = httpx.post(
        f"{tenant.stack.api_url}/docker-registry",
        json={"name": "audited", "url": "registry.example.com", "username": "u", "password": "secret-pw"},
        headers={**bearer(writer_key), "User-Agent": "scopes-test", "X-Daytona-Source": "sdk-test"},
    )
    assert created.status_code == 201, created.text
    registry_id = created.json()["id"]
    assert tenant.call("DELETE", f"/docker-registry/{registry_id}", writer_key).status_code == 204
    refused = tenant.call("DELETE", f"/sandbox/{uuid.uuid4()}", writer_key)
    assert refused.status_code == 403

    # Reading the log takes read:audit_logs.
    assert tenant.call("GET", "/audit-logs", writer_key).status_code == 403
    auditor = tenant.new_key("auditor", ["read:audit_logs"])
    answer = tenant.call("GET", f"/audit/organizations/{tenant.id}?limit=200", auditor)
    assert answer.status_code == 200, answer.text
    page = PaginatedAuditLogs.from_dict(answer.json())
    assert page.total == len(page.items) and page.total >= 5
    by_action = {(entry.action, entry.target_type, entry.target_id): entry for entry in page.items}
    create = by_action[("create", "docker_registry", registry_id)]
    assert (create.status_code, create.user_agent, create.source) == (201, "scopes-test", "sdk-test")
    assert create.actor_api_key_prefix and writer_key.startswith(create.actor_api_key_prefix)
    assert "secret-pw" not in answer.text  # bodies are never recorded
    assert by_action[("delete", "docker_registry", registry_id)].status_code == 204
    denied = next(e for e in page.items if e.action == "delete" and e.target_type == "sandbox")
    assert denied.status_code == 403 and "delete:sandboxes" in (denied.error_message or "")
    # The keys made by this test are there too, made by the organization's first key.
    assert ("create", "api_key", "auditor") in by_action
    # Newest first; a time window; another organization's log is 404.
    assert [e.created_at for e in page.items] == sorted((e.created_at for e in page.items), reverse=True)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    later = httpx.get(f"{tenant.stack.api_url}/audit-logs", params={"from": future}, headers=bearer(auditor))
    assert later.status_code == 200 and later.json()["items"] == [], later.text
    assert tenant.call("GET", f"/audit/organizations/{uuid.uuid4()}", auditor).status_code == 404
