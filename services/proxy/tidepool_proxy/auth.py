"""Who is calling: an API key (looked up by its SHA-256 in the KV mirror), or a signed file URL.

Signed file URLs (wire contract §1.8) carry `path`, `expires` and `signature` and no credentials:
`signature = "v1_" + b64url_nopad(HMAC_SHA256(key, f"v1:files:{METHOD}:{path}:{expires}"))`, with the
sandbox's signing key (API -> KV `KV_SIGNING_KEYS`, sealed: only the API and the proxy can open it), `path`
the URL-decoded query value and `expires` unix seconds (`0` = never). They grant exactly one thing:
`GET …/files/download` or `POST …/files/upload-v2` of that path on that one sandbox.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from aiohttp import web

from tidepool_contracts.models import ApiKeyRecord, SigningKeyRecord
from tidepool_contracts.subjects import KV_SIGNING_KEYS
from tidepool_proxy.kv_cache import KvCache
from tidepool_runtime.broker import KeyValue, kv_get
from tidepool_runtime.relay import is_websocket_upgrade, offered_subprotocols
from tidepool_runtime.sealing import Sealer

log = structlog.get_logger("tidepool.proxy.auth")
SIGNED_URL_QUERY_PARAMS = ("signature", "expires")
SIGNATURE_PREFIX = "v1_"
# (method, toolbox operation path) a signed URL may be used for.
SIGNED_OPERATIONS = frozenset({("GET", "/files/download"), ("POST", "/files/upload-v2")})
# What a KV key (and so a sandbox id) can be; anything else cannot have a signing key.
_KV_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_=-]{1,128}$")
# A browser's WebSocket cannot carry `Authorization`: the key comes as this subprotocol (see browser.py).
BEARER_SUBPROTOCOL_PREFIX = "Tidepool-Bearer~"


@dataclass(frozen=True)
class Access:
    """What a request may reach: one organization's sandboxes, or (organization None) just `sandbox_id`."""

    organization_id: str | None
    sandbox_id: str | None = None
    # An API key's scopes; None for a signed URL (its one operation was granted when it was signed, by a
    # key that needed write:sandboxes to get the signing key).
    permissions: frozenset[str] | None = None

    def lacks(self, permission: str) -> bool:
        return self.permissions is not None and permission not in self.permissions

    def allows(self, sandbox_id: str, sandbox_organization_id: str) -> bool:
        if self.organization_id is not None:
            return self.organization_id == sandbox_organization_id
        return self.sandbox_id == sandbox_id


class AuthenticationError(Exception):
    """The request carries no valid credentials (401)."""


class VerificationUnavailableError(Exception):
    """The credentials could not be checked right now (NATS unreachable on a cache miss): 503."""


def api_key_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def subprotocol_bearer(request: web.Request) -> str | None:
    """The key offered as `Tidepool-Bearer~<key>`, or None."""
    for offered in offered_subprotocols(request):
        if offered.startswith(BEARER_SUBPROTOCOL_PREFIX):
            token = offered.removeprefix(BEARER_SUBPROTOCOL_PREFIX).strip()
            return token or None
    return None


def is_signed_url(request: web.Request) -> bool:
    return all(name in request.query for name in SIGNED_URL_QUERY_PARAMS)


class SigningKeys:
    """The sandboxes' signing keys: a watched mirror of the KV bucket plus direct reads.

    A key rotated a moment ago may not have reached the watch yet: a signature that fails against the
    cached key is checked once more against a direct read, so URLs made with a brand-new key work at once.
    (URLs of the old key stop working as soon as the watch delivers the rotation, normally within a
    millisecond.)"""

    def __init__(self, kv: KeyValue, sealer: Sealer) -> None:
        self._kv = kv
        self._sealer = sealer
        self.cache: KvCache[SigningKeyRecord] = KvCache(kv, SigningKeyRecord, KV_SIGNING_KEYS)

    async def watch_forever(self) -> None:
        await self.cache.watch_forever()

    def _opened(self, record: SigningKeyRecord | None) -> SigningKeyRecord | None:
        """The record with its key unsealed; None for a key not sealed with ours (it verifies nothing)."""
        if record is None:
            return None
        try:
            return record.model_copy(update={"key": self._sealer.open(record.key)})
        except ValueError:
            log.warning("proxy.signing_key_unsealed", sandbox_id=record.sandbox_id)
            return None

    async def cached(self, sandbox_id: str) -> SigningKeyRecord | None:
        return self._opened(await self.cache.get(sandbox_id))

    async def fresh(self, sandbox_id: str) -> SigningKeyRecord | None:
        record = await kv_get(self._kv, sandbox_id, SigningKeyRecord)
        if record is not None:
            self.cache.apply(sandbox_id, record)
        return self._opened(record)


def file_url_signature(key: str, method: str, path: str, expires: str) -> str:
    canonical = f"v1:files:{method}:{path}:{expires}".encode()
    digest = hmac.new(key.encode(), canonical, hashlib.sha256).digest()
    return SIGNATURE_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _single_query_value(request: web.Request, name: str) -> str:
    values = request.query.getall(name, [])
    if len(values) != 1:
        raise AuthenticationError(f"signed URL must carry exactly one '{name}' parameter")
    return values[0]


def _signature_matches(
    record: SigningKeyRecord | None, method: str, path: str, expires: str, signature: str
) -> bool:
    if record is None:
        return False
    expected = file_url_signature(record.key, method, path, expires)
    return hmac.compare_digest(expected.encode(), signature.encode())


async def authenticate_signed_url(
    request: web.Request, sandbox_id: str, signing_keys: SigningKeys | None
) -> Access:
    """Verify a signed file URL; raises AuthenticationError (401) for anything that is not a valid one."""
    operation = "/" + request.match_info.get("path", "").strip("/")
    if (request.method, operation) not in SIGNED_OPERATIONS:
        raise AuthenticationError(
            "signed URLs are only valid for GET /files/download and POST /files/upload-v2"
        )
    path = _single_query_value(request, "path")
    expires = _single_query_value(request, "expires")
    signature = _single_query_value(request, "signature")
    if not expires.isdigit() or len(expires) > 20:
        raise AuthenticationError("invalid signed URL: 'expires' must be unix seconds")
    if int(expires) != 0 and int(expires) <= time.time():
        raise AuthenticationError("signed URL has expired")
    if not signature.startswith(SIGNATURE_PREFIX) or signing_keys is None:
        raise AuthenticationError("invalid signed URL signature")
    if not _KV_KEY_PATTERN.match(sandbox_id):
        raise AuthenticationError("invalid signed URL signature")
    try:
        if _signature_matches(
            await signing_keys.cached(sandbox_id), request.method, path, expires, signature
        ):
            return Access(organization_id=None, sandbox_id=sandbox_id)
        if _signature_matches(await signing_keys.fresh(sandbox_id), request.method, path, expires, signature):
            return Access(organization_id=None, sandbox_id=sandbox_id)
    except Exception as error:  # NATS unavailable on a cache miss
        raise VerificationUnavailableError(str(error)) from error
    raise AuthenticationError("invalid signed URL signature")


async def authenticate(
    request: web.Request,
    sandbox_id: str,
    api_keys: KvCache[ApiKeyRecord],
    signing_keys: SigningKeys | None = None,
) -> Access:
    """The caller's access: `Authorization: Bearer`, else (browsers' WebSockets) the key subprotocol, else a
    signed URL. Raises AuthenticationError (401) or VerificationUnavailableError (503)."""
    token = bearer_token(request)
    if token is None and is_websocket_upgrade(request):
        token = subprotocol_bearer(request)
    if token is None:
        if is_signed_url(request):
            return await authenticate_signed_url(request, sandbox_id, signing_keys)
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    record = await api_keys.get(api_key_hash(token))
    if record is None:
        raise AuthenticationError("invalid API key")
    if record.revoked:
        raise AuthenticationError("API key has been revoked")
    if record.expires_at is not None and _as_utc(record.expires_at) <= datetime.now(UTC):
        raise AuthenticationError("API key has expired")
    return Access(organization_id=record.organization_id, permissions=frozenset(record.permissions))


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
