"""SSH access tokens (behaviour spec "ssh-access", wire contract §2.2): `ssh <token>@gateway` opens a login
shell in one sandbox until the token expires or is revoked.

- The token (32 alphanumeric characters, like Daytona's nanoid without `_`/`-`) is shown once, by the create
  call. The database and the gateway's KV bucket (`tidepool_ssh_access`) keep only its SHA-256.
- Creating a token revokes the sandbox's earlier ones (as Daytona does); revoking deletes the KV entry, so
  the gateway refuses the token from that moment on. Expiry is checked by the gateway against `expires_at`.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api.context import ApiContext
from tidepool_api.db import Sandbox, SshAccess
from tidepool_contracts import channels
from tidepool_contracts.models import SshAccessGrant
from tidepool_runtime.broker import KeyValue, kv_delete, kv_put

TOKEN_LENGTH = 32
TOKEN_ALPHABET = string.ascii_letters + string.digits
DEFAULT_MINUTES = 60
MAX_MINUTES = 7 * 24 * 60


def new_token() -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_valid(access: SshAccess | None, now: datetime) -> bool:
    if access is None:
        return False
    expires = access.expires_at if access.expires_at.tzinfo else access.expires_at.replace(tzinfo=UTC)
    return expires > now


async def ssh_access_kv(context: ApiContext) -> KeyValue:
    if context.ssh_access_kv is None:
        context.ssh_access_kv = await context.bus.kv(channels.SSH_ACCESS)
    return context.ssh_access_kv


async def create(
    context: ApiContext,
    session: AsyncSession,
    sandbox: Sandbox,
    minutes: int,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[SshAccess, str]:
    """A new token for the sandbox (its earlier tokens are revoked first); returns the row and the token."""
    await revoke(context, session, sandbox.id, None)
    token = new_token()
    moment = now()
    access = SshAccess(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox.id,
        token_hash=token_hash(token),
        expires_at=moment + timedelta(minutes=minutes),
        created_at=moment,
        updated_at=moment,
    )
    session.add(access)
    await session.commit()
    await session.refresh(access)
    grant = SshAccessGrant(
        sandbox_id=sandbox.id, organization_id=sandbox.organization_id, expires_at=access.expires_at
    )
    await kv_put(await ssh_access_kv(context), access.token_hash, grant)
    return access, token


async def revoke(context: ApiContext, session: AsyncSession, sandbox_id: str, token: str | None) -> int:
    """Revoke one token of the sandbox, or all of them (token None); returns how many were revoked."""
    query = select(SshAccess).where(col(SshAccess.sandbox_id) == sandbox_id)
    if token is not None:
        query = query.where(col(SshAccess.token_hash) == token_hash(token))
    rows = list((await session.exec(query)).all())
    kv = await ssh_access_kv(context)
    for row in rows:
        await kv_delete(kv, row.token_hash)  # first the gateway forgets it, then the database
        await session.delete(row)
    await session.commit()
    return len(rows)


async def find(session: AsyncSession, token: str) -> SshAccess | None:
    query = select(SshAccess).where(col(SshAccess.token_hash) == token_hash(token))
    return (await session.exec(query)).first()
