"""Organization-scoped object-storage keys for the embedded S3 server (`rclone serve s3 --auth-proxy`).

An access key ID names its organization and expiry; its secret is an HMAC of the ID under the platform's
object-storage master secret, so the API can mint keys and the auth proxy can check them without any
shared state. The auth proxy maps every key to its organization's own directory: one tenant cannot see
another's objects, and an expired key is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

USER_KEY_PREFIX = "TPU"  # handed to SDK users by GET /object-storage/push-access; expires
SERVICE_KEY_PREFIX = "TPS"  # derived by platform services (the builder); does not expire
# `{prefix}.{organization}.{expiry}.{nonce}.{tag}`: the tag (an HMAC of the rest under the master secret) lets
# the auth proxy tell a key the platform minted from a forged one before it creates anything for it (rclone
# checks the request's signature only after the proxy answered).
_KEY = re.compile(r"^(TPU|TPS)\.([A-Za-z0-9-]{1,64})\.(\d{1,12})\.([a-z0-9]{0,16})\.([0-9a-f]{20})$")


@dataclass(frozen=True)
class ScopedKey:
    organization_id: str
    expires_at: int  # unix seconds; 0 = never
    service: bool


def secret_for(master_secret: str, access_key_id: str) -> str:
    return hmac.new(master_secret.encode(), access_key_id.encode(), hashlib.sha256).hexdigest()[:40]


def _tag(master_secret: str, body: str) -> str:
    return hmac.new(master_secret.encode(), f"key-id:{body}".encode(), hashlib.sha256).hexdigest()[:20]


def user_key(master_secret: str, organization_id: str, ttl_seconds: int) -> tuple[str, str, int]:
    """(access key ID, secret, expiry) for one organization's SDK uploads."""
    expires_at = int(time.time()) + ttl_seconds
    body = f"{USER_KEY_PREFIX}.{organization_id}.{expires_at}.{secrets.token_hex(4)}"
    access_key_id = f"{body}.{_tag(master_secret, body)}"
    return access_key_id, secret_for(master_secret, access_key_id), expires_at


def service_key(master_secret: str, organization_id: str) -> tuple[str, str]:
    body = f"{SERVICE_KEY_PREFIX}.{organization_id}.0."
    access_key_id = f"{body}.{_tag(master_secret, body)}"
    return access_key_id, secret_for(master_secret, access_key_id)


def parse_key(access_key_id: str, master_secret: str, now: float | None = None) -> ScopedKey | None:
    """The key's scope, or None when it is malformed, expired or was not minted with `master_secret`."""
    match = _KEY.match(access_key_id)
    if match is None or not master_secret:
        return None
    prefix, organization_id, expires_raw, _, tag = match.groups()
    body = access_key_id[: -(len(tag) + 1)]
    if not hmac.compare_digest(tag, _tag(master_secret, body)):
        return None
    expires_at = int(expires_raw)
    service = prefix == SERVICE_KEY_PREFIX
    if not service and expires_at <= (now if now is not None else time.time()):
        return None
    if service and expires_at != 0:
        return None
    return ScopedKey(organization_id=organization_id, expires_at=expires_at, service=service)
