"""The SSH gateway's login check (tidepool_ssh_gateway.grants): the token is looked up by its SHA-256,
expiry is honoured (with a moved clock: the API counts in whole minutes), a revoked token (deleted
entry) opens nothing, and the sandbox must be running and belong to the token's organization."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from nats.js.errors import KeyNotFoundError

from tidepool_contracts.models import SandboxRoute, SshAccessGrant
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import encode
from tidepool_ssh_gateway.grants import Grants, Refused, token_hash

TOKEN = "Abcdefghijklmnopqrstuvwxyz012345"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Entry:
    def __init__(self, value: bytes) -> None:
        self.value = value
        self.operation = None


class FakeKv:
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def get(self, key: str) -> Entry:
        if key not in self.entries:
            raise KeyNotFoundError
        return Entry(self.entries[key])


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def setup(
    state: SandboxState = SandboxState.STARTED, route_org: str = "org-a"
) -> tuple[Grants, FakeKv, Clock]:
    access, routes, clock = FakeKv(), FakeKv(), Clock()
    access.entries[token_hash(TOKEN)] = encode(
        SshAccessGrant(sandbox_id="sb-1", organization_id="org-a", expires_at=NOW + timedelta(minutes=1))
    )
    routes.entries["sb-1"] = encode(
        SandboxRoute(
            sandbox_id="sb-1",
            organization_id=route_org,
            runner_id="r1",
            runner_url="http://127.0.0.1:9/",
            state=state,
        )
    )
    return Grants(access, routes, now=clock), access, clock  # type: ignore[arg-type]


async def test_a_valid_token_opens_its_running_sandbox() -> None:
    grants, _, _ = setup()
    target = await grants.authorize(TOKEN)
    assert target.sandbox_id == "sb-1"
    assert target.runner_url == "http://127.0.0.1:9"


async def test_an_expired_token_is_refused() -> None:
    grants, _, clock = setup()
    clock.now = NOW + timedelta(seconds=59)
    await grants.authorize(TOKEN)
    clock.now = NOW + timedelta(minutes=1)
    with pytest.raises(Refused, match="expired"):
        await grants.authorize(TOKEN)


async def test_a_revoked_token_is_refused_at_once() -> None:
    grants, access, _ = setup()
    await grants.authorize(TOKEN)
    access.entries.clear()  # the API's revoke deletes the entry
    with pytest.raises(Refused, match="revoked"):
        await grants.authorize(TOKEN)


@pytest.mark.parametrize("name", ["", "root", "a" * 100, "Abcdefghijklmnop-rstuvwxyz012345", "x;rm -rf"])
async def test_what_is_not_a_token_is_refused(name: str) -> None:
    grants, _, _ = setup()
    with pytest.raises(Refused):
        await grants.authorize(name)


async def test_a_stopped_sandbox_is_not_reached() -> None:
    grants, _, _ = setup(state=SandboxState.STOPPED)
    with pytest.raises(Refused, match="not running"):
        await grants.authorize(TOKEN)


async def test_a_route_of_another_organization_is_not_reached() -> None:
    grants, _, _ = setup(route_org="org-b")
    with pytest.raises(Refused, match="not found"):
        await grants.authorize(TOKEN)
