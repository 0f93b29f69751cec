"""Snapshots (read side for now), client configuration and health."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func
from sqlmodel import col, or_, select

from tidepool_api.db import Snapshot
from tidepool_api.errors import not_found
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context
from tidepool_api.schemas import snapshot_dto

router = APIRouter()


@router.get("/health")
async def health() -> JsonResponse:
    return JsonResponse({"status": "ok"})


@router.get("/config")
async def client_config(context: Context) -> JsonResponse:
    settings = context.settings
    return JsonResponse(
        {
            "version": "0.1.0",
            "oidc": {"issuer": "", "clientId": "", "audience": "", "provider": "none"},
            "linkedAccountsEnabled": False,
            "announcements": {},
            "proxyTemplateUrl": "",
            "proxyToolboxUrl": settings.toolbox_proxy_url,
            "defaultSnapshot": settings.default_snapshot,
            "dashboardUrl": "",
            "maxAutoArchiveInterval": 43200,
            "maintananceMode": False,
            "environment": "self-hosted",
        }
    )


def visible_to(organization_id: str):  # type: ignore[no-untyped-def]
    return or_(Snapshot.organization_id == organization_id, col(Snapshot.general).is_(True))


@router.get("/snapshots")
async def list_snapshots(
    context: Context,
    caller: Caller,
    page: Annotated[int, Query(ge=1)] = 1,
    limit: Annotated[int, Query(ge=1, le=200)] = 100,
) -> JsonResponse:
    async with context.database.sessions() as session:
        total = (
            await session.exec(
                select(func.count()).select_from(Snapshot).where(visible_to(caller.organization_id))
            )
        ).one()
        rows = (
            await session.exec(
                select(Snapshot)
                .where(visible_to(caller.organization_id))
                .order_by(col(Snapshot.created_at), col(Snapshot.name))
                .offset((page - 1) * limit)
                .limit(limit)
            )
        ).all()
    return JsonResponse(
        {
            "items": [snapshot_dto(row) for row in rows],
            "total": total,
            "page": page,
            "totalPages": max(1, -(-total // limit)),
        }
    )


@router.get("/snapshots/{id_or_name:path}")
async def get_snapshot(context: Context, caller: Caller, id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        snapshot = (
            await session.exec(
                select(Snapshot).where(
                    or_(Snapshot.id == id_or_name, Snapshot.name == id_or_name),
                    visible_to(caller.organization_id),
                )
            )
        ).first()
    if snapshot is None:
        raise not_found(f"Snapshot {id_or_name} not found")
    return JsonResponse(snapshot_dto(snapshot))
