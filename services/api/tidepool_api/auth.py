"""Bearer API keys: hashed at rest, scoped to one organization, mirrored to NATS KV for the proxy."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Request
from sqlalchemy import update
from sqlmodel import col, select

from tidepool_api.db import ApiKey, Database
from tidepool_api.errors import ApiError
from tidepool_contracts.models import ApiKeyRecord

KEY_PREFIX = "tp_"
# Verified keys are cached briefly: the hot path (every request) must not hit the database.
CACHE_SECONDS = 30.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_record(api_key: ApiKey) -> ApiKeyRecord:
    """What the proxy needs of a key, scopes included (it checks write:sandboxes on toolbox calls)."""
    return ApiKeyRecord(
        key_id=api_key.id,
        organization_id=api_key.organization_id,
        expires_at=api_key.expires_at,
        revoked=api_key.revoked,
        permissions=tuple(api_key.permissions or ()),
    )


@dataclass(frozen=True)
class Principal:
    organization_id: str
    key_id: str
    key_name: str = ""
    key_prefix: str = ""
    # The key's scopes (tidepool_contracts.permissions); reads need none.
    permissions: frozenset[str] = frozenset()
    expires_at: datetime | None = None


class Authenticator:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token: set DAYTONA_API_KEY")
        return await self.authenticate_token(token.strip())

    async def authenticate_token(self, token: str) -> Principal:
        """The organization of an API key; ApiError 401 when it is unknown, revoked or expired."""
        key_hash = hash_key(token)
        cached = self._cache.get(key_hash)
        now = time.monotonic()
        if cached and cached[0] > now:
            principal = cached[1]
            # A cached key still expires on time: expiry is never up to 30 s late.
            if principal.expires_at and _aware(principal.expires_at) < datetime.now(UTC):
                raise ApiError(401, "API key expired")
            return principal
        async with self.database.sessions() as session:
            api_key = (await session.exec(select(ApiKey).where(ApiKey.key_hash == key_hash))).first()
            if api_key is None or api_key.revoked:
                raise ApiError(401, "invalid API key")
            if api_key.expires_at and _aware(api_key.expires_at) < datetime.now(UTC):
                raise ApiError(401, "API key expired")
            # `lastUsedAt`: written when the key is looked up, so at most once per cache period (and not
            # for toolbox calls, which the proxy checks from KV).
            await session.exec(  # type: ignore[call-overload]
                update(ApiKey).where(col(ApiKey.id) == api_key.id).values(last_used_at=datetime.now(UTC))
            )
            await session.commit()
        principal = Principal(
            organization_id=api_key.organization_id,
            key_id=api_key.id,
            key_name=api_key.name,
            key_prefix=api_key.key_prefix,
            permissions=frozenset(api_key.permissions or ()),
            expires_at=api_key.expires_at,
        )
        self._cache[key_hash] = (now + CACHE_SECONDS, principal)
        return principal

    def forget(self, key_hash: str) -> None:
        self._cache.pop(key_hash, None)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
