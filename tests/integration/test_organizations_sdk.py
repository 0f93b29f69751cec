"""Issue #9 item 6: the admin role is explicit, and the admin deletes an organization with what it owns.

Through REST (organization management is not in the SDK) and the official SDK as the tenant, against a real
stack: the tenant's sandbox container goes through the normal intent path, its snapshots, registries and
keys go, and its key stops working at once, in the API and in the toolbox proxy.
"""

from __future__ import annotations

import subprocess
import uuid

import httpx
import pytest
from daytona import Daytona, DaytonaAuthenticationError, DaytonaConfig

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration]


def container_exists(sandbox_id: str) -> bool:
    result = subprocess.run(
        ["podman", "container", "exists", f"tidepool-{sandbox_id}"], capture_output=True, check=False
    )
    return result.returncode == 0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_tenant(stack: StackThread) -> tuple[str, str]:
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"team-{uuid.uuid4().hex[:6]}"},
        headers=bearer(stack.api_key),
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["apiKey"]["value"]


def test_admin_deletes_an_organization_and_everything_it_owns(stack: StackThread) -> None:
    organization_id, key = create_tenant(stack)
    tenant = Daytona(DaytonaConfig(api_key=key, api_url=stack.api_url))
    sandbox = tenant.create()
    assert sandbox.state == "started" and container_exists(sandbox.id)
    second_key = httpx.post(f"{stack.api_url}/api-keys", json={"name": "ci"}, headers=bearer(key))
    assert second_key.status_code == 201, second_key.text
    registry = httpx.post(
        f"{stack.api_url}/docker-registry",
        json={"name": "r", "url": "registry.example.com", "username": "u", "password": "p"},
        headers=bearer(key),
    )
    assert registry.status_code == 201, registry.text
    # A tenant is not the operator: 403, and nothing happens.
    other_id, other_key = create_tenant(stack)
    refused = httpx.delete(f"{stack.api_url}/organizations/{organization_id}", headers=bearer(other_key))
    assert refused.status_code == 403, refused.text
    refused = httpx.post(f"{stack.api_url}/organizations", json={"name": "x"}, headers=bearer(other_key))
    assert refused.status_code == 403, refused.text
    assert tenant.get(sandbox.id).state == "started"

    deleted = httpx.delete(f"{stack.api_url}/organizations/{organization_id}", headers=bearer(stack.api_key))
    assert deleted.status_code == 204, deleted.text

    # Every key of the organization is refused at once, by the API and by the toolbox proxy.
    for old_key in (key, second_key.json()["value"]):
        answer = httpx.get(f"{stack.api_url}/sandbox", headers=bearer(old_key))
        assert answer.status_code == 401, answer.text
    with pytest.raises(DaytonaAuthenticationError):
        list(tenant.list())  # a lazy pager: the request happens while iterating
    # The proxy learns of the revocation through its KV watch: within moments, never after a cache period.
    wait_until(
        lambda: (
            httpx.get(f"{stack.proxy_url}/toolbox/{sandbox.id}/files?path=/", headers=bearer(key)).status_code
            == 401
        ),
        "the toolbox proxy still accepts the deleted organization's key",
        timeout=5,
    )
    # The container goes through the runner, as any deleted sandbox's.
    wait_until(
        lambda: not container_exists(sandbox.id), "the deleted organization's container remains", timeout=120
    )

    # Deleted means gone: a second delete, or an unknown id, is 404; the admin organization stays.
    again = httpx.delete(f"{stack.api_url}/organizations/{organization_id}", headers=bearer(stack.api_key))
    assert again.status_code == 404, again.text
    unknown = httpx.delete(f"{stack.api_url}/organizations/{uuid.uuid4()}", headers=bearer(stack.api_key))
    assert unknown.status_code == 404, unknown.text
    # The other tenant is untouched.
    assert httpx.get(f"{stack.api_url}/sandbox", headers=bearer(other_key)).status_code == 200
    assert other_id != organization_id
    # The deletion is recorded (a structured log line naming the organization and what went with it).
    wait_until(
        lambda: any(
            "organization.deleted" in line and organization_id in line
            for line in stack.log_path.read_text().splitlines()
        ),
        "no organization.deleted record in the stack log",
    )


def test_the_admin_organization_cannot_be_deleted(stack: StackThread) -> None:
    listed = httpx.get(f"{stack.api_url}/api-keys", headers=bearer(stack.api_key))
    assert listed.status_code == 200, listed.text
    admin_id = listed.json()[0]["organizationId"]
    answer = httpx.delete(f"{stack.api_url}/organizations/{admin_id}", headers=bearer(stack.api_key))
    assert answer.status_code == 403, answer.text
    assert httpx.get(f"{stack.api_url}/sandbox", headers=bearer(stack.api_key)).status_code == 200
