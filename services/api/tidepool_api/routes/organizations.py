"""Organizations and API keys. Keys are shown once, stored hashed, and mirrored to KV for the proxy.

Organizations are managed by the admin organization only (`organization.is_admin`, the one `make up`
creates): others get 403 on `POST /organizations` and `DELETE /organizations/{id}`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import Field
from sqlmodel import col, select

from tidepool_api import organizations
from tidepool_api.auth import generate_key, hash_key
from tidepool_api.context import ApiContext
from tidepool_api.db import ApiKey, Organization
from tidepool_api.errors import conflict, not_found
from tidepool_api.organizations import publish_key
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context
from tidepool_api.schemas import PlainName, Text, WireModel, error_responses, iso

router = APIRouter(responses=error_responses(401))


class CreateOrganizationRequest(WireModel):
    """`CreateOrganization` (`defaultRegionId` is ignored: one region per installation)."""

    name: PlainName


class CreateApiKeyRequest(WireModel):
    """`CreateApiKey`: `permissions` is accepted and ignored (every key has its organization's rights)."""

    name: PlainName
    permissions: Annotated[list[Text], Field(max_length=64)] | None = None
    expires_at: datetime | None = None


class ApiKeyDto(WireModel):
    """`ApiKeyResponse`: `value` is the full key, shown only in the answer that creates it."""

    name: str
    value: str
    created_at: str
    expires_at: str | None
    permissions: list[str]


class ApiKeyListDto(ApiKeyDto):
    """`ApiKeyList`: `value` is the key's first characters and `…`. There are no users in Tidepool:
    `userId` is the organization's id, `lastUsedAt` is not tracked (null)."""

    last_used_at: str | None
    user_id: str
    organization_id: str


class OrganizationCreatedDto(WireModel):
    """The new organization and its first key (the only time that key's value is shown)."""

    id: str
    name: str
    created_at: str
    api_key: ApiKeyDto


async def issue_key(
    context: ApiContext, organization_id: str, name: str, expires_at: datetime | None
) -> tuple[ApiKey, str]:
    value = generate_key()
    api_key = ApiKey(
        id=str(uuid.uuid4()),
        organization_id=organization_id,
        name=name,
        key_hash=hash_key(value),
        key_prefix=value[:8],
        expires_at=expires_at,
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


def key_dto(api_key: ApiKey, value: str) -> dict[str, object]:
    return {
        "name": api_key.name,
        "value": value,
        "createdAt": iso(api_key.created_at),
        "expiresAt": iso(api_key.expires_at) if api_key.expires_at else None,
        "permissions": [],
    }


def key_list_dto(api_key: ApiKey) -> dict[str, object]:
    return {
        **key_dto(api_key, f"{api_key.key_prefix}…"),
        "lastUsedAt": None,
        "userId": api_key.organization_id,
        "organizationId": api_key.organization_id,
    }


@router.post(
    "/organizations",
    status_code=201,
    response_model=OrganizationCreatedDto,
    responses=error_responses(400, 403, 409, 413),
)
async def create_organization(
    context: Context, caller: Caller, body: CreateOrganizationRequest
) -> JsonResponse:
    """Self-hosted administration: the admin organization creates tenants, each with a first key."""
    await organizations.require_admin(context, caller.organization_id)
    organization = Organization(id=str(uuid.uuid4()), name=body.name)
    async with context.database.sessions() as session:
        session.add(organization)
        await session.commit()
    api_key, value = await issue_key(context, organization.id, "default", None)
    return JsonResponse(
        status_code=201,
        content={
            "id": organization.id,
            "name": organization.name,
            "createdAt": iso(organization.created_at),
            "apiKey": key_dto(api_key, value),
        },
    )


@router.delete(
    "/organizations/{organization_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(403, 404),
)
async def delete_organization(context: Context, caller: Caller, organization_id: str) -> Response:
    """Admin only: revoke the organization's keys at once, delete its sandboxes (their containers go
    asynchronously, through the runners), snapshots and registries; 404 for an unknown or deleted one."""
    await organizations.require_admin(context, caller.organization_id)
    await organizations.delete_organization(context, organization_id, deleted_by=caller.organization_id)
    return Response(status_code=204)


@router.get("/api-keys", response_model=list[ApiKeyListDto])
async def list_api_keys(context: Context, caller: Caller) -> JsonResponse:
    async with context.database.sessions() as session:
        keys = (
            await session.exec(
                select(ApiKey).where(
                    ApiKey.organization_id == caller.organization_id, col(ApiKey.revoked).is_(False)
                )
            )
        ).all()
    return JsonResponse([key_list_dto(api_key) for api_key in keys])


@router.post("/api-keys", status_code=201, response_model=ApiKeyDto, responses=error_responses(400, 409, 413))
async def create_api_key(context: Context, caller: Caller, body: CreateApiKeyRequest) -> JsonResponse:
    api_key, value = await issue_key(context, caller.organization_id, body.name, body.expires_at)
    return JsonResponse(status_code=201, content=key_dto(api_key, value))


@router.delete("/api-keys/{name}", status_code=204, response_class=Response, responses=error_responses(404))
async def revoke_api_key(context: Context, caller: Caller, name: str) -> Response:
    async with context.database.sessions() as session:
        api_key = (
            await session.exec(
                select(ApiKey).where(
                    ApiKey.organization_id == caller.organization_id,
                    ApiKey.name == name,
                    col(ApiKey.revoked).is_(False),
                )
            )
        ).first()
        if api_key is None:
            raise not_found(f"API key {name} not found")
        api_key.revoked = True
        session.add(api_key)
        await session.commit()
    context.authenticator.forget(api_key.key_hash)
    await publish_key(context, api_key)
    return Response(status_code=204)
