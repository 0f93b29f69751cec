"""Per-sandbox signing keys for signed file URLs (wire contract §1.8).

`GET /sandbox/{sandboxId}/signing-key` returns the key (created on first use) and
`POST /sandbox/{sandboxId}/signing-key/rotate` replaces it, so every URL signed with the old key fails.
Both answer a bare JSON string, as the SDK's generated client expects (`'200': "str"`).

The database column `sandbox.signing_key` is the source of truth; every write is mirrored to the KV bucket
`KV_SIGNING_KEYS`, from which the proxy verifies signatures without touching the database. The mirrored key
is sealed with the key only the API and the proxy hold (tidepool_runtime.sealing): a bus client that can
read the bucket cannot forge URLs. A missing, stale or unsealed mirror entry is repaired on the next read.
"""

from __future__ import annotations

import secrets

import structlog
from fastapi import APIRouter, Request
from sqlalchemy import and_, update
from sqlmodel import col

from tidepool_api import sandboxes
from tidepool_api.db import Sandbox
from tidepool_api.errors import ApiError
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Context, SandboxWriter
from tidepool_api.schemas import error_responses
from tidepool_contracts import channels
from tidepool_contracts.models import SigningKeyRecord
from tidepool_runtime.broker import KeyValue, kv_get, kv_put
from tidepool_runtime.sealing import Sealer

log = structlog.get_logger("tidepool.api.signing")
router = APIRouter(prefix="/sandbox", tags=["sandbox"], responses=error_responses(401, 404, 503))

SIGNING_KEY_BYTES = 32


def new_signing_key() -> str:
    return secrets.token_urlsafe(SIGNING_KEY_BYTES)


async def signing_keys_kv(request: Request, context: Context) -> KeyValue:
    """The bucket handle, bound once per application (binding costs a NATS round trip)."""
    state = request.app.state
    kv: KeyValue | None = getattr(state, "signing_keys_kv", None)
    if kv is None:
        kv = await context.bus.kv(channels.SIGNING_KEYS)
        state.signing_keys_kv = kv
    return kv


def _opens_to(sealer: Sealer, sealed: str, key: str) -> bool:
    try:
        return sealer.open(sealed) == key
    except ValueError:  # unsealed (an older mirror) or sealed with another key: rewrite it
        return False


async def mirror(kv: KeyValue, sealer: Sealer, sandbox: Sandbox, key: str, *, force: bool) -> None:
    """Write the key, sealed, to the proxy's KV mirror (unless it is already there, when not forced)."""
    try:
        if not force:
            current = await kv_get(kv, sandbox.id, SigningKeyRecord)
            if current is not None and _opens_to(sealer, current.key, key):
                return
        record = SigningKeyRecord(
            sandbox_id=sandbox.id, organization_id=sandbox.organization_id, key=sealer.seal(key)
        )
        await kv_put(kv, sandbox.id, record)
    except Exception as error:
        log.warning("signing.mirror_failed", sandbox_id=sandbox.id, error=str(error))
        raise ApiError(503, "signing keys are temporarily unavailable; retry") from error


@router.get("/{sandbox_id}/signing-key", response_model=str)
async def get_signing_key(
    context: Context, caller: SandboxWriter, request: Request, sandbox_id: str
) -> JsonResponse:
    kv = await signing_keys_kv(request, context)
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id)
        key = sandbox.signing_key
        created = key is None
        if key is None:
            # Compare-and-set: two first calls racing must end up with (and return) the same key.
            await session.exec(  # type: ignore[call-overload]
                update(Sandbox)
                .where(and_(col(Sandbox.id) == sandbox.id, col(Sandbox.signing_key).is_(None)))
                .values(signing_key=new_signing_key())
            )
            await session.commit()
            await session.refresh(sandbox)
            key = sandbox.signing_key
    if key is None:  # pragma: no cover - the row vanished between the update and the read
        raise ApiError(404, f"Sandbox with ID or name {sandbox_id} not found")
    await mirror(kv, context.signing_sealer, sandbox, key, force=created)
    return JsonResponse(key)


@router.post("/{sandbox_id}/signing-key/rotate", response_model=str)
async def rotate_signing_key(
    context: Context, caller: SandboxWriter, request: Request, sandbox_id: str
) -> JsonResponse:
    kv = await signing_keys_kv(request, context)
    key = new_signing_key()
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id)
        sandbox.signing_key = key
        session.add(sandbox)
        await session.commit()
    await mirror(kv, context.signing_sealer, sandbox, key, force=True)
    log.info("signing.rotated", sandbox_id=sandbox.id)
    return JsonResponse(key)
