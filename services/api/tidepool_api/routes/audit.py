"""Audit logs (Daytona's `AuditApi`): an organization's records, newest first, paged, filtered by time.

Needs `read:audit_logs`. `GET /audit/organizations/{organizationId}` is the SDK's path (another
organization's id is 404); `GET /audit-logs` is the caller's organization. Records are written by
`tidepool_api.audit` for every authenticated write.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import func
from sqlmodel import col, select

from tidepool_api.auth import Principal
from tidepool_api.db import AuditLog
from tidepool_api.errors import not_found
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Context, Requires
from tidepool_api.schemas import INT32_MAX, WireModel, error_responses, iso
from tidepool_contracts.permissions import Permission

router = APIRouter(tags=["audit"], responses=error_responses(400, 401))
AuditReader = Annotated[Principal, Requires(Permission.READ_AUDIT_LOGS)]


class AuditLogDto(WireModel):
    """`AuditLog`: the actor is an API key (`actorId` its id, `actorEmail` empty: no users in Tidepool)."""

    id: str
    actor_id: str
    actor_email: str
    actor_api_key_prefix: str | None
    actor_api_key_suffix: str | None
    organization_id: str | None
    action: str
    target_type: str | None
    target_id: str | None
    status_code: int | None
    error_message: str | None
    ip_address: str | None
    user_agent: str | None
    source: str | None
    metadata: dict[str, Any] | None
    created_at: str


class PaginatedAuditLogsDto(WireModel):
    items: list[AuditLogDto]
    total: int
    page: int
    total_pages: int
    next_token: str | None


def audit_dto(record: AuditLog) -> dict[str, object]:
    return {
        "id": record.id,
        "actorId": record.actor_id,
        "actorEmail": "",
        "actorApiKeyPrefix": record.actor_api_key_prefix,
        "actorApiKeySuffix": None,
        "organizationId": record.organization_id,
        "action": record.action,
        "targetType": record.target_type,
        "targetId": record.target_id,
        "statusCode": record.status_code,
        "errorMessage": record.error_message,
        "ipAddress": record.ip_address,
        "userAgent": record.user_agent,
        "source": record.source,
        "metadata": record.detail,
        "createdAt": iso(record.created_at),
    }


async def page_of(
    context: Context,
    organization_id: str,
    page: int,
    limit: int,
    since: datetime | None,
    until: datetime | None,
) -> JsonResponse:
    condition = [col(AuditLog.organization_id) == organization_id]
    if since is not None:
        condition.append(col(AuditLog.created_at) >= since)
    if until is not None:
        condition.append(col(AuditLog.created_at) <= until)
    async with context.database.sessions() as session:
        total = (await session.exec(select(func.count()).select_from(AuditLog).where(*condition))).one()
        rows = (
            await session.exec(
                select(AuditLog)
                .where(*condition)
                .order_by(col(AuditLog.created_at).desc(), col(AuditLog.id))
                .offset((page - 1) * limit)
                .limit(limit)
            )
        ).all()
    return JsonResponse(
        {
            "items": [audit_dto(row) for row in rows],
            "total": total,
            "page": page,
            "totalPages": max(1, -(-total // limit)),
            "nextToken": None,
        }
    )


Page = Annotated[int, Query(ge=1, le=INT32_MAX)]
Limit = Annotated[int, Query(ge=1, le=200)]
Since = Annotated[datetime | None, Query(alias="from", description="records at or after (ISO 8601)")]
Until = Annotated[datetime | None, Query(alias="to", description="records at or before (ISO 8601)")]


@router.get(
    "/audit/organizations/{organization_id}",
    response_model=PaginatedAuditLogsDto,
    responses=error_responses(404),
)
async def organization_audit_logs(
    context: Context,
    caller: AuditReader,
    organization_id: str,
    page: Page = 1,
    limit: Limit = 100,
    since: Since = None,
    until: Until = None,
) -> JsonResponse:
    if organization_id != caller.organization_id:
        raise not_found(f"Organization {organization_id} not found")
    return await page_of(context, organization_id, page, limit, since, until)


@router.get("/audit-logs", response_model=PaginatedAuditLogsDto)
async def audit_logs(
    context: Context,
    caller: AuditReader,
    page: Page = 1,
    limit: Limit = 100,
    since: Since = None,
    until: Until = None,
) -> JsonResponse:
    return await page_of(context, caller.organization_id, page, limit, since, until)
