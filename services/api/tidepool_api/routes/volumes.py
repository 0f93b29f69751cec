"""`/volumes` endpoints (wire contract §2.6): not paged; deleted volumes are left out unless asked for."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlmodel import col, select

from tidepool_api import volumes
from tidepool_api.db import Volume
from tidepool_api.errors import not_found
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Context, VolumeDeleter, VolumeReader, VolumeWriter
from tidepool_api.schemas import CreateVolumeRequest, VolumeDto, error_responses, volume_dto

router = APIRouter(prefix="/volumes", tags=["volumes"], responses=error_responses(401))


@router.get("", response_model=list[VolumeDto])
async def list_volumes(
    context: Context,
    caller: VolumeReader,
    include_deleted: Annotated[bool, Query(alias="includeDeleted")] = False,
) -> JsonResponse:
    statement = select(Volume).where(Volume.organization_id == caller.organization_id)
    if not include_deleted:
        statement = statement.where(Volume.state != volumes.DELETED)
    async with context.database.sessions() as session:
        rows = (await session.exec(statement.order_by(col(Volume.created_at)))).all()
    return JsonResponse([volume_dto(row) for row in rows])


@router.post("", response_model=VolumeDto, responses=error_responses(400, 503))
async def create_volume(context: Context, caller: VolumeWriter, request: CreateVolumeRequest) -> JsonResponse:
    volume = await volumes.create_volume(context, caller.organization_id, request.name)
    return JsonResponse(volume_dto(volume))


@router.get("/by-name/{name}", response_model=VolumeDto, responses=error_responses(404))
async def get_volume_by_name(context: Context, caller: VolumeReader, name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        volume = (
            await session.exec(
                select(Volume).where(
                    Volume.organization_id == caller.organization_id,
                    Volume.name == name,
                    Volume.state != volumes.DELETED,
                )
            )
        ).first()
    if volume is None:
        raise not_found(f"Volume with name {name} not found")
    return JsonResponse(volume_dto(volume))


@router.get("/{volume_id}", response_model=VolumeDto, responses=error_responses(404))
async def get_volume(context: Context, caller: VolumeReader, volume_id: str) -> JsonResponse:
    async with context.database.sessions() as session:
        volume = await session.get(Volume, volume_id)
    if volume is None or volume.organization_id != caller.organization_id:
        raise not_found(f"Volume {volume_id} not found")
    return JsonResponse(volume_dto(volume))


@router.delete("/{volume_id}", response_class=Response, responses=error_responses(400, 404, 409, 503))
async def delete_volume(context: Context, caller: VolumeDeleter, volume_id: str) -> Response:
    await volumes.delete_volume(context, caller.organization_id, volume_id)
    return Response(status_code=200)
