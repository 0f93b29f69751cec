"""Organizations; each new one gets a first key with every permission (`routes/api_keys.py`).

Organizations are managed by the admin organization only (`organization.is_admin`, the one `make up`
creates), with a key that holds every permission (it mints full-access keys): others get 403 on
`POST /organizations` and `DELETE /organizations/{id}`.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from fastapi.responses import Response

from tidepool_api import organizations
from tidepool_api.db import Organization
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.api_keys import ApiKeyDto, issue_key, key_dto
from tidepool_api.routes.deps import Context, FullAccess
from tidepool_api.schemas import PlainName, WireModel, error_responses, iso
from tidepool_contracts.permissions import ALL_PERMISSIONS

router = APIRouter(responses=error_responses(401))


class CreateOrganizationRequest(WireModel):
    """`CreateOrganization` (`defaultRegionId` is ignored: one region per installation)."""

    name: PlainName


class OrganizationCreatedDto(WireModel):
    """The new organization and its first key (the only time that key's value is shown)."""

    id: str
    name: str
    created_at: str
    api_key: ApiKeyDto


@router.post(
    "/organizations",
    status_code=201,
    response_model=OrganizationCreatedDto,
    responses=error_responses(400, 403, 409, 413),
)
async def create_organization(
    context: Context, caller: FullAccess, body: CreateOrganizationRequest
) -> JsonResponse:
    """Self-hosted administration: the admin organization creates tenants, each with a first key."""
    await organizations.require_admin(context, caller.organization_id)
    organization = Organization(id=str(uuid.uuid4()), name=body.name)
    async with context.database.sessions() as session:
        session.add(organization)
        await session.commit()
    api_key, value = await issue_key(context, organization.id, "default", None, ALL_PERMISSIONS)
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
async def delete_organization(context: Context, caller: FullAccess, organization_id: str) -> Response:
    """Admin only: revoke the organization's keys at once, delete its sandboxes (their containers go
    asynchronously, through the runners), snapshots and registries; 404 for an unknown or deleted one."""
    await organizations.require_admin(context, caller.organization_id)
    await organizations.delete_organization(context, organization_id, deleted_by=caller.organization_id)
    return Response(status_code=204)
