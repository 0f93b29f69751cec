"""`GET /object-storage/push-access`: where and with what the SDK uploads declarative-build context.

The SDK (`SnapshotService.process_image_context`) asks for these credentials before uploading each local
context as `{organizationId}/{hash}/context.tar` to `storageUrl` (path-style, SigV4, https only).

Daytona answers with STS credentials scoped to `{bucket}/{organizationId}/*` for one hour. With the embedded
object storage (`s3_scoped_keys`), the key is minted here: it names the organization and expires in an hour,
and the storage's auth proxy maps it to that organization's own directory (tidepool_runtime.object_keys),
so a tenant can neither read nor overwrite another's context. With an external S3 given as a static key
pair, that pair is returned (scoping then needs STS on that server). The `sessionToken` is an HMAC-signed,
expiring token naming the organization, which the SDK signs into every request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import structlog
from fastapi import APIRouter

from tidepool_api.errors import ApiError
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context
from tidepool_runtime.object_keys import user_key
from tidepool_runtime.settings import ApiSettings

log = structlog.get_logger("tidepool.api.object_storage")
router = APIRouter()

SESSION_TOKEN_PREFIX = "tps1"
SESSION_TOKEN_SECONDS = 3600  # as Daytona's STS sessions
_KEY_CONTEXT = b"tidepool object-storage session token v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_key(secret_key: str) -> bytes:
    # Derived, so that the token never exposes anything usable as the S3 secret itself.
    return hmac.new(secret_key.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def issue_session_token(
    secret_key: str, organization_id: str, ttl_seconds: int = SESSION_TOKEN_SECONDS, now: float | None = None
) -> str:
    """`tps1.<b64url(json {org, exp})>.<b64url(HMAC-SHA256)>`, signed with a key derived from the secret."""
    issued = int(time.time() if now is None else now)
    payload = json.dumps({"org": organization_id, "exp": issued + ttl_seconds}, separators=(",", ":"))
    signed = f"{SESSION_TOKEN_PREFIX}.{_b64(payload.encode())}"
    signature = hmac.new(_signing_key(secret_key), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64(signature)}"


def verify_session_token(secret_key: str, token: str, now: float | None = None) -> str | None:
    """The organization the token was issued to, or None if it is malformed, forged or expired."""
    prefix, _, rest = token.partition(".")
    body, _, signature = rest.partition(".")
    if prefix != SESSION_TOKEN_PREFIX or not body or not signature:
        return None
    expected = hmac.new(_signing_key(secret_key), f"{prefix}.{body}".encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, _unb64(signature)):
            return None
        claims = json.loads(_unb64(body))
    except (ValueError, TypeError):
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("org"), str):
        return None
    expires = claims.get("exp")
    if not isinstance(expires, int) or expires <= (time.time() if now is None else now):
        return None
    return claims["org"]


def object_storage_configured(settings: ApiSettings) -> bool:
    has_keys = settings.s3_scoped_keys or bool(settings.s3_access_key)
    return bool(settings.s3_endpoint and settings.s3_secret_key and has_keys)


@router.get("/object-storage/push-access")
async def push_access(context: Context, caller: Caller) -> JsonResponse:
    settings = context.settings
    if not object_storage_configured(settings):
        raise ApiError(
            503,
            "object storage is not configured: set TIDEPOOL_S3_ENDPOINT, TIDEPOOL_S3_ACCESS_KEY and "
            "TIDEPOOL_S3_SECRET_KEY (`tidepool up` starts an embedded one); images with local files "
            "(add_local_file, add_local_dir, ...) cannot be built without it",
        )
    if not settings.s3_endpoint.startswith("https://"):
        log.warning("object_storage.plain_http", endpoint=settings.s3_endpoint, hint="the SDK requires https")
    if settings.s3_scoped_keys:
        access_key, secret, _ = user_key(
            settings.s3_secret_key, caller.organization_id, SESSION_TOKEN_SECONDS
        )
    else:
        access_key, secret = settings.s3_access_key, settings.s3_secret_key
    return JsonResponse(
        {
            "accessKey": access_key,
            "secret": secret,
            "sessionToken": issue_session_token(settings.s3_secret_key, caller.organization_id),
            "storageUrl": settings.s3_endpoint.rstrip("/"),
            "organizationId": caller.organization_id,
            "bucket": settings.s3_bucket,
            "region": settings.s3_region,
        }
    )
