"""API keys (wire contract: `ApiKeysApi`): shown once, stored hashed, scoped, mirrored to KV for the proxy.

- `permissions` are Daytona's scopes (`tidepool_contracts.permissions.Permission`); `[]` makes a read-only
  key; an omitted list copies the caller's. A key never mints a broader key, nor revokes one (403).
- `expiresAt` must be in the future; an expired key is refused (401) by the API and by the proxy.
- Lists and reads show `value` masked (the key's first characters and `…`). There are no users in
  Tidepool: `userId` is the organization's id, which is what `DELETE /api-keys/{userId}/{name}` takes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import Field
from sqlmodel import col, select

from tidepool_api.auth import Principal, generate_key, hash_key
from tidepool_api.context import ApiContext
from tidepool_api.db import ApiKey
from tidepool_api.errors import ApiError, bad_request, conflict, not_found
from tidepool_api.organizations import publish_key
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context
from tidepool_api.schemas import PlainName, WireModel, error_responses, iso
from tidepool_contracts.permissions import Permission, missing, normalized

router = APIRouter(prefix="/api-keys", tags=["api-keys"], responses=error_responses(401))
RESERVED_NAMES = frozenset({"current"})  # `GET /api-keys/current` is the calling key


class CreateApiKeyRequest(WireModel):
    """`CreateApiKey`."""

    name: PlainName
    permissions: Annotated[list[Permission], Field(max_length=64)] | None = None
    expires_at: datetime | None = None


class ApiKeyDto(WireModel):
    """`ApiKeyResponse`: `value` is the full key, shown only in the answer that creates it."""

    name: str
    value: str
    created_at: str
    expires_at: str | None
    permissions: list[str]


class ApiKeyListDto(ApiKeyDto):
    """`ApiKeyList`: `value` masked; `lastUsedAt` is when the API last looked the key up (it caches a
    key for 30 s; toolbox calls, checked by the proxy, do not count)."""

    last_used_at: str | None
    user_id: str
    organization_id: str


def key_dto(api_key: ApiKey, value: str) -> dict[str, object]:
    return {
        "name": api_key.name,
        "value": value,
        "createdAt": iso(api_key.created_at),
        "expiresAt": iso(api_key.expires_at) if api_key.expires_at else None,
        "permissions": list(api_key.permissions or ()),
    }


def key_list_dto(api_key: ApiKey) -> dict[str, object]:
    return {
        **key_dto(api_key, f"{api_key.key_prefix}…"),
        "lastUsedAt": iso(api_key.last_used_at) if api_key.last_used_at else None,
        "userId": api_key.organization_id,
        "organizationId": api_key.organization_id,
    }


def refuse_broader(caller: Principal, permissions: Iterable[str], doing: str) -> None:
    """403 when `permissions` include one the caller's key does not hold."""
    extra = missing(caller.permissions, permissions)
    if extra:
        lacking = ", ".join(extra)
        message = f"cannot {doing} a key with permissions the API key '{caller.key_name}' lacks: {lacking}"
        raise ApiError(403, message)


async def issue_key(
    context: ApiContext,
    organization_id: str,
    name: str,
    expires_at: datetime | None,
    permissions: Iterable[str],
) -> tuple[ApiKey, str]:
    """A new key of the organization; returns the row and the plain value (never stored)."""
    if name in RESERVED_NAMES:
        raise bad_request(f"name: '{name}' is reserved")
    if expires_at is not None:
        expires_at = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=UTC)
        if expires_at <= datetime.now(UTC):
            raise bad_request("expiresAt: must be in the future")
    value = generate_key()
    api_key = ApiKey(
        id=str(uuid.uuid4()),
        organization_id=organization_id,
        name=name,
        key_hash=hash_key(value),
        key_prefix=value[:8],
        expires_at=expires_at,
        permissions=normalized(permissions),
    )
    async with context.database.sessions() as session:
        duplicate = await session.exec(
            select(ApiKey.id).where(
                ApiKey.organization_id == organization_id, ApiKey.name == name, col(ApiKey.revoked).is_(False)
            )
        )
        if duplicate.first() is not None:
            raise conflict(f"API key with name {name} already exists")
        session.add(api_key)
        await session.commit()
    await publish_key(context, api_key)
    return api_key, value


async def find_key(context: ApiContext, organization_id: str, name: str) -> ApiKey:
    async with context.database.sessions() as session:
        api_key = (
            await session.exec(
                select(ApiKey).where(
                    ApiKey.organization_id == organization_id,
                    ApiKey.name == name,
                    col(ApiKey.revoked).is_(False),
                )
            )
        ).first()
    if api_key is None:
        raise not_found(f"API key {name} not found")
    return api_key


async def revoke(context: ApiContext, caller: Principal, name: str) -> None:
    api_key = await find_key(context, caller.organization_id, name)
    refuse_broader(caller, api_key.permissions or (), "revoke")
    async with context.database.sessions() as session:
        row = await session.get(ApiKey, api_key.id)
        if row is None or row.revoked:
            raise not_found(f"API key {name} not found")
        row.revoked = True
        session.add(row)
        await session.commit()
        await session.refresh(row)
    # At once: the API's cache forgets it, the proxy learns it through its KV watch.
    context.authenticator.forget(row.key_hash)
    await publish_key(context, row)


@router.get("", response_model=list[ApiKeyListDto])
async def list_api_keys(context: Context, caller: Caller) -> JsonResponse:
    async with context.database.sessions() as session:
        keys = (
            await session.exec(
                select(ApiKey)
                .where(ApiKey.organization_id == caller.organization_id, col(ApiKey.revoked).is_(False))
                .order_by(col(ApiKey.created_at))
            )
        ).all()
    return JsonResponse([key_list_dto(api_key) for api_key in keys])


@router.post("", status_code=201, response_model=ApiKeyDto, responses=error_responses(400, 403, 409, 413))
async def create_api_key(context: Context, caller: Caller, body: CreateApiKeyRequest) -> JsonResponse:
    permissions = (
        [permission.value for permission in body.permissions]
        if body.permissions is not None
        else sorted(caller.permissions)
    )
    refuse_broader(caller, permissions, "create")
    api_key, value = await issue_key(context, caller.organization_id, body.name, body.expires_at, permissions)
    return JsonResponse(status_code=201, content=key_dto(api_key, value))


@router.get("/current", response_model=ApiKeyListDto)
async def get_current_api_key(context: Context, caller: Caller) -> JsonResponse:
    """The key that authenticated this request."""
    async with context.database.sessions() as session:
        api_key = await session.get(ApiKey, caller.key_id)
    if api_key is None or api_key.revoked:  # revoked meanwhile (the authenticator caches for seconds)
        raise ApiError(401, "invalid API key")
    return JsonResponse(key_list_dto(api_key))


@router.get("/{name}", response_model=ApiKeyListDto, responses=error_responses(404))
async def get_api_key(context: Context, caller: Caller, name: str) -> JsonResponse:
    return JsonResponse(key_list_dto(await find_key(context, caller.organization_id, name)))


@router.delete("/{name}", status_code=204, response_class=Response, responses=error_responses(403, 404))
async def delete_api_key(context: Context, caller: Caller, name: str) -> Response:
    await revoke(context, caller, name)
    return Response(status_code=204)


@router.delete(
    "/{user_id}/{name}", status_code=204, response_class=Response, responses=error_responses(403, 404)
)
async def delete_api_key_for_user(context: Context, caller: Caller, user_id: str, name: str) -> Response:
    """`userId` is the organization's id (the `userId` of its keys); another id is 404."""
    if user_id != caller.organization_id:
        raise not_found(f"API key {name} not found")
    await revoke(context, caller, name)
    return Response(status_code=204)
