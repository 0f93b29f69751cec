"""`/snapshots` endpoints (wire contract §2.5) and build logs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import func
from sqlmodel import col, select

from tidepool_api import snapshots
from tidepool_api.buildlogs import stream_build_log
from tidepool_api.db import Snapshot
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context, SnapshotDeleter, SnapshotWriter
from tidepool_api.schemas import (
    INT32_MAX,
    NAME_MAX,
    TEXT_PLAIN,
    PaginatedSnapshotsDto,
    SnapshotDto,
    UrlDto,
    error_responses,
    snapshot_dto,
)
from tidepool_contracts.models import SnapshotState

router = APIRouter(prefix="/snapshots", tags=["snapshots"], responses=error_responses(401))
READ = error_responses(404)
WRITE = error_responses(400, 403, 404, 409)
SETTLED = {SnapshotState.ACTIVE.value, SnapshotState.ERROR.value, SnapshotState.BUILD_FAILED.value}


@router.get("", response_model=PaginatedSnapshotsDto, responses=error_responses(400))
async def list_snapshots(
    context: Context,
    caller: Caller,
    page: Annotated[int, Query(ge=1, le=INT32_MAX)] = 1,
    limit: Annotated[int, Query(ge=1, le=200)] = 100,
    name: Annotated[str | None, Query(max_length=NAME_MAX, description="substring of the name")] = None,
) -> JsonResponse:
    condition = [snapshots.visible_to(caller.organization_id), col(Snapshot.hidden).is_(False)]
    if name:
        condition.append(col(Snapshot.name).contains(name))
    async with context.database.sessions() as session:
        total = (await session.exec(select(func.count()).select_from(Snapshot).where(*condition))).one()
        rows = (
            await session.exec(
                select(Snapshot)
                .where(*condition)
                .order_by(col(Snapshot.general).desc(), col(Snapshot.created_at), col(Snapshot.name))
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


@router.post("", response_model=SnapshotDto, responses=error_responses(400, 404, 409, 413))
async def create_snapshot(
    context: Context, caller: SnapshotWriter, body: snapshots.CreateSnapshotRequest
) -> JsonResponse:
    snapshot = await snapshots.create_snapshot(context, caller.organization_id, body)
    return JsonResponse(snapshot_dto(snapshot))


@router.get("/{id_or_name:path}/build-logs-url", response_model=UrlDto, responses=READ)
async def build_logs_url(context: Context, caller: Caller, id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        snapshot = await snapshots.find_snapshot(session, caller.organization_id, id_or_name)
    return JsonResponse(
        {"url": f"{context.settings.effective_public_api_url}/snapshots/{snapshot.id}/build-logs"}
    )


@router.get(
    "/{id_or_name:path}/build-logs", response_class=StreamingResponse, responses={200: TEXT_PLAIN, **READ}
)
async def build_logs(context: Context, caller: Caller, id_or_name: str, follow: bool = False) -> Response:
    async with context.database.sessions() as session:
        snapshot = await snapshots.find_snapshot(session, caller.organization_id, id_or_name)

    async def finished() -> bool:
        async with context.database.sessions() as session:
            row = await session.get(Snapshot, snapshot.id)
        return row is None or row.state in SETTLED

    ref = snapshot.ref or snapshot.image_name
    return StreamingResponse(stream_build_log(context.bus, ref, follow, finished), media_type="text/plain")


@router.post("/{id_or_name:path}/activate", response_model=SnapshotDto, responses=WRITE)
async def activate(context: Context, caller: SnapshotWriter, id_or_name: str) -> JsonResponse:
    return JsonResponse(
        snapshot_dto(await snapshots.set_active(context, caller.organization_id, id_or_name, True))
    )


@router.post("/{id_or_name:path}/deactivate", status_code=204, response_class=Response, responses=WRITE)
async def deactivate(context: Context, caller: SnapshotWriter, id_or_name: str) -> Response:
    await snapshots.set_active(context, caller.organization_id, id_or_name, False)
    return Response(status_code=204)


@router.get("/{id_or_name:path}", response_model=SnapshotDto, responses=READ)
async def get_snapshot(context: Context, caller: Caller, id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        snapshot = await snapshots.find_snapshot(session, caller.organization_id, id_or_name)
    return JsonResponse(snapshot_dto(snapshot))


@router.delete("/{id_or_name:path}", response_class=Response, responses=WRITE)
async def delete_snapshot(context: Context, caller: SnapshotDeleter, id_or_name: str) -> Response:
    await snapshots.delete_snapshot(context, caller.organization_id, id_or_name)
    return Response(status_code=200)
