"""API rate limits: Daytona's throttlers (behaviour spec "limits"), counted per organization.

Three throttlers, each a fixed window per organization (as NestJS's throttler: `limit` requests per `ttl`):

- `sandbox-create`: `POST /sandbox` and `POST /sandbox/{id}/fork`,
- `sandbox-lifecycle`: `DELETE /sandbox/{id}`, `POST /sandbox/{id}/start|stop|pause|resize|recover|archive`,
- `authenticated`: every other authenticated request (the two above skip it).

Every answer to an authenticated request carries `X-RateLimit-Limit-{t}`, `X-RateLimit-Remaining-{t}` and
`X-RateLimit-Reset-{t}` (seconds) of its throttler; a request over the limit gets 429
`{"statusCode":429,"message":"Rate limit exceeded","error":"Too Many Requests"}` with `Retry-After-{t}`
(seconds), which the SDK raises as `DaytonaRateLimitError`. It is refused before its
audit record and its handler: it did nothing.

Limits: the organization's own (`PATCH /organizations/{id}/quota`: `authenticatedRateLimit`,
`sandboxCreateRateLimit`, `sandboxLifecycleRateLimit` and their `*TtlSeconds`), else the installation's
(`TIDEPOOL_RATE_LIMIT_*`, window `TIDEPOOL_RATE_LIMIT_WINDOW_SECONDS`), else the tier's per minute. The admin
organization is not limited unless its own row says so. Counters live in this API process (one API per
installation today; replicas would each count their own share).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidepool_api.auth import Principal
from tidepool_api.db import Database, Organization
from tidepool_api.errors import ApiError
from tidepool_api.quotas import tier
from tidepool_runtime.settings import ApiSettings

AUTHENTICATED = "authenticated"
SANDBOX_CREATE = "sandbox-create"
SANDBOX_LIFECYCLE = "sandbox-lifecycle"
STATE_KEY = "rate_limit_headers"
POLICY_TTL_SECONDS = 5.0  # how long an organization's limits are cached (a PATCH forgets them at once)
CREATE_PATH = re.compile(r"^/api/sandbox/?$|^/api/sandbox/[^/]+/fork/?$")
LIFECYCLE_PATH = re.compile(r"^/api/sandbox/[^/]+/(start|stop|pause|resize|recover|archive)/?$")
ONE_SANDBOX_PATH = re.compile(r"^/api/sandbox/[^/]+/?$")


def throttler_of(method: str, path: str) -> str:
    """Which throttler counts a request, from its method and URL path."""
    if method == "POST" and CREATE_PATH.match(path):
        return SANDBOX_CREATE
    if (method == "DELETE" and ONE_SANDBOX_PATH.match(path)) or (
        method == "POST" and LIFECYCLE_PATH.match(path)
    ):
        return SANDBOX_LIFECYCLE
    return AUTHENTICATED


@dataclass(frozen=True)
class Rule:
    limit: int  # requests per window; 0 = unlimited
    window: float  # seconds


class RateLimited(ApiError):
    """429 with Daytona's body; `headers` go on the answer."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__(429, "Rate limit exceeded")
        self.headers = headers


class RateLimiter:
    def __init__(self, database: Database, settings: ApiSettings) -> None:
        self.database = database
        self.settings = settings
        self._policies: dict[str, tuple[float, dict[str, Rule]]] = {}
        # (organization, throttler) -> (window start, hits)
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}

    def forget(self, organization_id: str) -> None:
        """Read the organization's limits afresh (after a change) and start its windows over."""
        self._policies.pop(organization_id, None)
        for key in [key for key in self._windows if key[0] == organization_id]:
            del self._windows[key]

    async def _policy(self, organization_id: str) -> dict[str, Rule]:
        now = time.monotonic()
        cached = self._policies.get(organization_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.database.sessions() as session:
            organization = await session.get(Organization, organization_id)
        policy = self._rules(organization) if organization is not None else {}
        if len(self._policies) > 10_000:
            self._policies.clear()
        self._policies[organization_id] = (now + POLICY_TTL_SECONDS, policy)
        return policy

    def _rules(self, organization: Organization) -> dict[str, Rule]:
        settings, default = self.settings, tier(self.settings)
        rows = {
            AUTHENTICATED: (
                organization.authenticated_rate_limit,
                organization.authenticated_rate_limit_ttl_seconds,
                settings.rate_limit_authenticated or default.authenticated,
            ),
            SANDBOX_CREATE: (
                organization.sandbox_create_rate_limit,
                organization.sandbox_create_rate_limit_ttl_seconds,
                settings.rate_limit_sandbox_create or default.sandbox_create,
            ),
            SANDBOX_LIFECYCLE: (
                organization.sandbox_lifecycle_rate_limit,
                organization.sandbox_lifecycle_rate_limit_ttl_seconds,
                settings.rate_limit_sandbox_lifecycle or default.sandbox_lifecycle,
            ),
        }
        rules: dict[str, Rule] = {}
        for name, (own, own_ttl, installation) in rows.items():
            if own is None and organization.is_admin:
                continue  # the operator's organization: unlimited unless set on its row
            limit = own if own is not None else installation
            window = float(own_ttl) if own_ttl else settings.rate_limit_window_seconds
            if limit > 0:
                rules[name] = Rule(limit, window)
        return rules

    async def hit(self, principal: Principal, method: str, path: str) -> dict[str, str]:
        """Count one request; the headers to answer with. Raises `RateLimited` over the limit."""
        throttler = throttler_of(method, path)
        rule = (await self._policy(principal.organization_id)).get(throttler)
        if rule is None:
            return {}
        now = time.monotonic()
        key = (principal.organization_id, throttler)
        start, hits = self._windows.get(key, (now, 0))
        if now - start >= rule.window:
            start, hits = now, 0
        reset = max(1, math.ceil(start + rule.window - now))
        headers = {
            f"X-RateLimit-Limit-{throttler}": str(rule.limit),
            f"X-RateLimit-Reset-{throttler}": str(reset),
        }
        if hits >= rule.limit:
            headers[f"X-RateLimit-Remaining-{throttler}"] = "0"
            # Only the suffixed form, as NestJS's throttler: a plain `Retry-After` makes the Python SDK's
            # urllib3 sleep and resend silently instead of raising DaytonaRateLimitError.
            headers[f"Retry-After-{throttler}"] = str(reset)
            raise RateLimited(headers)
        hits += 1
        self._windows[key] = (start, hits)
        headers[f"X-RateLimit-Remaining-{throttler}"] = str(rule.limit - hits)
        return headers


class RateLimitHeadersMiddleware:
    """Puts the throttler's headers (left in the request state by the check) on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra: dict[str, str] = state.get(STATE_KEY) or {}
                if extra:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    message["headers"] = list(message.get("headers", [])) + [
                        (name.lower().encode(), value.encode())
                        for name, value in extra.items()
                        if name.lower().encode() not in present
                    ]
            await send(message)

        await self.app(scope, receive, with_headers)
