"""Who may log in: the SSH access token (the user name) looked up by its SHA-256 in the API's KV bucket.

Every login reads the bucket directly (a login is rare, and a revoked token must fail at once), then the
sandbox's route (where it runs, and whether it runs). Expiry is checked here against `expires_at`, with the
clock passed in so tests can move it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tidepool_contracts.models import SandboxRoute, SshAccessGrant
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import KeyValue, kv_get

# Tokens are 32 alphanumerics; anything else is refused before any lookup.
_TOKEN = re.compile(r"^[A-Za-z0-9]{16,64}$")


@dataclass(frozen=True)
class Target:
    """What an authenticated connection reaches: one started sandbox on one runner."""

    sandbox_id: str
    runner_url: str


class Refused(Exception):
    """The token opens nothing (unknown, revoked, expired, or its sandbox is not running)."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_grant(grant: SshAccessGrant | None, now: datetime) -> SshAccessGrant:
    if grant is None:
        raise Refused("unknown or revoked token")
    expires = grant.expires_at if grant.expires_at.tzinfo else grant.expires_at.replace(tzinfo=UTC)
    if expires <= now:
        raise Refused("token has expired")
    return grant


def check_route(grant: SshAccessGrant, route: SandboxRoute | None) -> Target:
    # A route of another organization cannot be this token's sandbox (defence in depth).
    if route is None or route.organization_id != grant.organization_id:
        raise Refused("sandbox not found")
    if route.state != SandboxState.STARTED:
        raise Refused(f"sandbox is not running (state: {route.state})")
    return Target(sandbox_id=route.sandbox_id, runner_url=route.runner_url.rstrip("/"))


class Grants:
    def __init__(
        self,
        access_kv: KeyValue,
        routes_kv: KeyValue,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._access = access_kv
        self._routes = routes_kv
        self._now = now

    async def authorize(self, token: str) -> Target:
        if not _TOKEN.match(token):
            raise Refused("not an SSH access token")
        grant = check_grant(await kv_get(self._access, token_hash(token), SshAccessGrant), self._now())
        return check_route(grant, await kv_get(self._routes, grant.sandbox_id, SandboxRoute))
