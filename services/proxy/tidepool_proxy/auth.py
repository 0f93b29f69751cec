"""Who is calling: an API key (looked up by its SHA-256 in the KV mirror), or later a signed URL."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from tidepool_contracts.models import ApiKeyRecord
from tidepool_proxy.kv_cache import KvCache

SIGNED_URL_QUERY_PARAMS = ("signature", "expires")


@dataclass(frozen=True)
class Access:
    """What a request may reach: one organization's sandboxes, or (organization None) just `sandbox_id`."""

    organization_id: str | None
    sandbox_id: str | None = None

    def allows(self, sandbox_id: str, sandbox_organization_id: str) -> bool:
        if self.organization_id is not None:
            return self.organization_id == sandbox_organization_id
        return self.sandbox_id == sandbox_id


class AuthenticationError(Exception):
    """The request carries no valid credentials (401)."""


def api_key_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_signed_url(request: web.Request) -> bool:
    return all(name in request.query for name in SIGNED_URL_QUERY_PARAMS)


async def authenticate_signed_url(request: web.Request, sandbox_id: str) -> Access | None:
    """Hook for signed file URLs (`?path=&expires=&signature=`, spec §1.8). Not implemented yet: every signed
    URL is unauthenticated. When it is, return `Access(organization_id=None, sandbox_id=sandbox_id)`."""
    return None


async def authenticate(request: web.Request, sandbox_id: str, api_keys: KvCache[ApiKeyRecord]) -> Access:
    token = bearer_token(request)
    if token is None:
        if is_signed_url(request):
            access = await authenticate_signed_url(request, sandbox_id)
            if access is not None:
                return access
            raise AuthenticationError("invalid or expired signed URL")
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    record = await api_keys.get(api_key_hash(token))
    if record is None:
        raise AuthenticationError("invalid API key")
    if record.revoked:
        raise AuthenticationError("API key has been revoked")
    if record.expires_at is not None and _as_utc(record.expires_at) <= datetime.now(UTC):
        raise AuthenticationError("API key has expired")
    return Access(organization_id=record.organization_id)


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
