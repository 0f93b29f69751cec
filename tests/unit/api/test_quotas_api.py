"""Issue #12 quotas and rate limits through REST against the real FastAPI app, SQLite and nats-server (the
`api` fixture; runner events published by the test): admission of a burst is atomic, stop and delete
release quota, the admin alone sets limits, Daytona's errors, throttler headers and 429. The SDK tests
(tests/integration/test_quotas_sdk.py) repeat the burst against the real stack on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlmodel import select
from test_api_service import api, report  # noqa: F401 (the fixture, shared with the API service tests)

from tests.polling import wait_until_async
from tidepool_api.context import ApiContext
from tidepool_api.db import AuditLog
from tidepool_api.ratelimit import RateLimiter, throttler_of
from tidepool_contracts.states import SandboxState

Api = tuple[httpx.AsyncClient, ApiContext, str]


async def tenant(client: httpx.AsyncClient) -> tuple[str, httpx.AsyncClient]:
    """A new organization and a client with its first key (same app)."""
    created = await client.post("/api/organizations", json={"name": f"t-{uuid.uuid4().hex[:6]}"})
    assert created.status_code == 201, created.text
    body = created.json()
    other = httpx.AsyncClient(
        transport=client._transport,
        base_url="http://api",
        headers={"Authorization": f"Bearer {body['apiKey']['value']}"},
    )
    return body["id"], other


async def set_quota(client: httpx.AsyncClient, organization_id: str, **values: Any) -> dict[str, Any]:
    response = await client.patch(f"/api/organizations/{organization_id}/quota", json=values)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_burst_of_50_creates_against_a_quota_of_10_admits_exactly_10(api: Api) -> None:  # noqa: F811
    client, _, _ = api
    organization_id, team = await tenant(client)
    usage = await set_quota(client, organization_id, totalCpuQuota=10)
    # The tier-1 defaults stand for what was not set.
    assert usage["totalCpuQuota"] == 10 and usage["totalMemoryQuota"] == 10 and usage["totalDiskQuota"] == 30
    await set_quota(client, organization_id, totalMemoryQuota=100, totalDiskQuota=1000)

    answers = await asyncio.gather(*(team.post("/api/sandbox", json={}) for _ in range(50)))
    created = [answer.json() for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code != 200]
    assert len(created) == 10
    assert {answer.status_code for answer in refused} == {403}
    assert {answer.json()["message"].split("\n")[0] for answer in refused} == {
        "Total CPU limit exceeded. Maximum allowed: 10."
    }
    listed = (await team.get("/api/sandbox")).json()["items"]
    assert sorted(item["id"] for item in listed) == sorted(item["id"] for item in created)
    usage = (await team.get(f"/api/organizations/{organization_id}/usage")).json()
    assert (usage["currentCpuUsage"], usage["currentMemoryUsage"], usage["currentDiskUsage"]) == (10, 10, 30)

    # Stopping frees cpu and memory (not disk): one more create fits, then none.
    first, second = created[0]["id"], created[1]["id"]
    await report(team_bus(api), first, organization_id, SandboxState.STARTED)
    await wait_state(team, first, "started")
    assert (await team.post(f"/api/sandbox/{first}/stop")).status_code == 200
    await report(team_bus(api), first, organization_id, SandboxState.STOPPED)
    await wait_state(team, first, "stopped")
    usage = (await team.get(f"/api/organizations/{organization_id}/usage")).json()
    assert (usage["currentCpuUsage"], usage["currentDiskUsage"]) == (9, 30)
    assert (await team.post("/api/sandbox", json={})).status_code == 200
    again = await team.post("/api/sandbox", json={})
    assert again.status_code == 403 and again.json()["message"].startswith("Total CPU limit exceeded")
    # Starting the stopped one needs its cpu back: refused while full.
    start = await team.post(f"/api/sandbox/{first}/start")
    assert start.status_code == 403 and start.json()["message"].startswith("Total CPU limit exceeded")
    # Deleting frees everything at once.
    assert (await team.delete(f"/api/sandbox/{second}")).status_code == 200
    assert (await team.post(f"/api/sandbox/{first}/start")).status_code == 200
    await team.aclose()


async def test_per_sandbox_maxima_resize_and_disk_quota(api: Api) -> None:  # noqa: F811
    client, _, _ = api
    organization_id, team = await tenant(client)
    await set_quota(client, organization_id, maxCpuPerSandbox=2, totalDiskQuota=5)
    over = await team.post("/api/sandbox", json={"cpu": 3})
    assert over.status_code == 403
    assert over.json()["message"].startswith("CPU request 3 exceeds maximum allowed per sandbox (2).")
    one = await team.post("/api/sandbox", json={"disk": 3})
    assert one.status_code == 200
    full = await team.post("/api/sandbox", json={"disk": 3})
    assert full.status_code == 403 and full.json()["message"].startswith(
        "Total disk limit exceeded. Maximum allowed: 5GiB."
    )
    # null puts the default back: 4 cpu per sandbox.
    usage = await set_quota(client, organization_id, maxCpuPerSandbox=None, totalDiskQuota=None)
    assert usage["maxCpuPerSandbox"] == 4 and usage["totalDiskQuota"] == 30
    await team.aclose()


async def test_only_the_admin_sets_limits_and_usage_is_private(api: Api) -> None:  # noqa: F811
    client, _, _ = api
    organization_id, team = await tenant(client)
    _, other = await tenant(client)
    refused = await team.patch(f"/api/organizations/{organization_id}/quota", json={"totalCpuQuota": 99})
    assert refused.status_code == 403
    assert (await other.get(f"/api/organizations/{organization_id}/usage")).status_code == 404
    assert (await client.get(f"/api/organizations/{organization_id}/usage")).status_code == 200
    missing = await client.patch("/api/organizations/nope/quota", json={"totalCpuQuota": 1})
    assert missing.status_code == 404
    bad = await client.patch(f"/api/organizations/{organization_id}/quota", json={"totalCpuQuota": -1})
    assert bad.status_code == 400
    await team.aclose()
    await other.aclose()


async def test_snapshot_quota(api: Api) -> None:  # noqa: F811
    client, _, _ = api
    organization_id, team = await tenant(client)
    await set_quota(client, organization_id, snapshotQuota=1)
    body = {"name": "one", "imageName": "docker.io/library/alpine:3.20"}
    first = await team.post("/api/snapshots", json=body)
    assert first.status_code in (200, 201), first.text
    second = await team.post("/api/snapshots", json={**body, "name": "two"})
    assert (
        second.status_code == 400
        and second.json()["message"] == "Snapshot quota exceeded. Maximum allowed: 1"
    )
    await team.aclose()


async def test_rate_limits_headers_429_and_no_audit(api: Api) -> None:  # noqa: F811
    client, context, _ = api
    context.rate_limiter = RateLimiter(context.database, context.settings)
    organization_id, team = await tenant(client)
    await set_quota(client, organization_id, sandboxCreateRateLimit=2, authenticatedRateLimit=3)
    remaining = []
    for _ in range(2):
        answer = await team.post("/api/sandbox", json={})
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-limit-sandbox-create"] == "2"
        remaining.append(answer.headers["x-ratelimit-remaining-sandbox-create"])
        assert "x-ratelimit-limit-authenticated" not in answer.headers  # create skips the general counter
    assert remaining == ["1", "0"]
    limited = await team.post("/api/sandbox", json={"name": "throttled"})
    assert limited.status_code == 429
    body = limited.json()
    assert (body["statusCode"], body["message"], body["error"]) == (
        429,
        "Rate limit exceeded",
        "Too Many Requests",
    )
    assert int(limited.headers["retry-after-sandbox-create"]) >= 1
    # No plain Retry-After: the SDK's urllib3 would sleep and resend instead of raising the 429.
    assert "retry-after" not in limited.headers
    assert limited.headers["x-ratelimit-remaining-sandbox-create"] == "0"
    # The refused request did nothing: no sandbox, no audit record.
    names = [item["name"] for item in (await team.get("/api/sandbox")).json()["items"]]
    assert "throttled" not in names
    async with context.database.sessions() as session:
        actions = (
            await session.exec(
                select(AuditLog.status_code).where(
                    AuditLog.organization_id == organization_id, AuditLog.target_type == "sandbox"
                )
            )
        ).all()
    assert sorted(actions) == [200, 200]
    # The general counter: 3 per window, 1 used by the list above.
    statuses = [(await team.get("/api/sandbox")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    # Per organization: the admin (unlimited unless set) and another tenant are not affected.
    assert (await client.get("/api/sandbox")).status_code == 200
    assert "x-ratelimit-limit-authenticated" not in (await client.get("/api/sandbox")).headers
    _, other = await tenant(client)
    answer = await other.get("/api/sandbox")
    assert answer.status_code == 200 and answer.headers["x-ratelimit-limit-authenticated"] == "10000"
    await team.aclose()
    await other.aclose()


def team_bus(running: Api) -> Any:
    return running[1].bus


async def wait_state(client: httpx.AsyncClient, sandbox_id: str, state: str) -> None:
    async def reached() -> bool:
        return (await client.get(f"/api/sandbox/{sandbox_id}")).json()["state"] == state

    await wait_until_async(reached, f"sandbox {sandbox_id} never reached {state}")


@pytest.mark.parametrize(
    ("method", "path", "throttler"),
    [
        ("POST", "/api/sandbox", "sandbox-create"),
        ("POST", "/api/sandbox/sb-1/fork", "sandbox-create"),
        ("DELETE", "/api/sandbox/sb-1", "sandbox-lifecycle"),
        ("POST", "/api/sandbox/sb-1/start", "sandbox-lifecycle"),
        ("POST", "/api/sandbox/sb-1/archive", "sandbox-lifecycle"),
        ("POST", "/api/sandbox/sb-1/resize", "sandbox-lifecycle"),
        ("DELETE", "/api/sandbox/sb-1/ssh-access", "authenticated"),
        ("POST", "/api/sandbox/sb-1/labels", "authenticated"),
        ("GET", "/api/sandbox/sb-1", "authenticated"),
        ("POST", "/api/snapshots", "authenticated"),
    ],
)
def test_which_throttler_counts_a_request(method: str, path: str, throttler: str) -> None:
    assert throttler_of(method, path) == throttler
