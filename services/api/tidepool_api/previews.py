"""Preview access (behaviour spec "preview", wire contract §1.9): what the proxy needs to let a request
through to `{port}-{sandboxId}.{domain}`, mirrored to NATS KV so the proxy never reads the database.

- The preview token (`X-Daytona-Preview-Token`) is replaced on every start: a token handed out before a
  stop opens nothing after the next start. The database keeps the token (the API returns it); the KV keeps
  only its SHA-256.
- Signed preview URLs `{port}-{token}.{domain}` carry their token in the host name: 32 characters of
  lowercase base32 (host names are case-insensitive) and no `-`, so they never look like a sandbox id. The
  KV holds SHA-256(token) -> sandbox, port and expiry; expiring one early deletes it.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from tidepool_api.context import ApiContext
from tidepool_api.db import Sandbox
from tidepool_contracts import channels
from tidepool_contracts.models import PreviewAccess, SignedPreview
from tidepool_runtime.broker import KeyValue, kv_delete, kv_get, kv_put

PREVIEW_TOKEN_BYTES = 24
SIGNED_TOKEN_BYTES = 20  # 32 base32 characters
SIGNED_DEFAULT_SECONDS = 60
SIGNED_MAX_SECONDS = 24 * 3600


def new_preview_token() -> str:
    return secrets.token_urlsafe(PREVIEW_TOKEN_BYTES)


def new_signed_token() -> str:
    return base64.b32encode(secrets.token_bytes(SIGNED_TOKEN_BYTES)).decode().lower().rstrip("=")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def previews_kv(context: ApiContext) -> KeyValue:
    if context.previews_kv is None:
        context.previews_kv = await context.bus.kv(channels.PREVIEWS)
    return context.previews_kv


async def signed_previews_kv(context: ApiContext) -> KeyValue:
    if context.signed_previews_kv is None:
        context.signed_previews_kv = await context.bus.kv(channels.SIGNED_PREVIEWS)
    return context.signed_previews_kv


def access_of(sandbox: Sandbox) -> PreviewAccess:
    return PreviewAccess(
        sandbox_id=sandbox.id,
        organization_id=sandbox.organization_id,
        public=sandbox.public,
        token_hash=token_hash(sandbox.preview_token) if sandbox.preview_token else "",
    )


async def publish_access(context: ApiContext, sandbox: Sandbox) -> None:
    """Mirror the sandbox's preview access to the proxy's bucket."""
    await kv_put(await previews_kv(context), sandbox.id, access_of(sandbox))


async def ensure_access(context: ApiContext, sandbox: Sandbox) -> None:
    """Repair a missing or stale mirror (e.g. a sandbox created before previews existed)."""
    kv = await previews_kv(context)
    wanted = access_of(sandbox)
    current = await kv_get(kv, sandbox.id, PreviewAccess)
    if current is None or (current.public, current.token_hash) != (wanted.public, wanted.token_hash):
        await kv_put(kv, sandbox.id, wanted)


async def forget_access(context: ApiContext, sandbox_id: str) -> None:
    """A destroyed sandbox's previews answer 404 from now on."""
    await kv_delete(await previews_kv(context), sandbox_id)


async def sign(context: ApiContext, sandbox: Sandbox, port: int, expires_in_seconds: int) -> str:
    token = new_signed_token()
    record = SignedPreview(
        sandbox_id=sandbox.id,
        organization_id=sandbox.organization_id,
        port=port,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_seconds),
    )
    await kv_put(await signed_previews_kv(context), token_hash(token), record)
    return token


async def expire_signed(context: ApiContext, sandbox: Sandbox, port: int, token: str) -> bool:
    """Expire a signed URL of this sandbox and port now; False when there is no such (live) URL."""
    kv = await signed_previews_kv(context)
    key = token_hash(token.lower())
    record = await kv_get(kv, key, SignedPreview)
    if record is None or record.sandbox_id != sandbox.id or record.port != port:
        return False
    await kv_delete(kv, key)
    return True
