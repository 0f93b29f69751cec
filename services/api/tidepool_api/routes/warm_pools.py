"""`/warm-pools` endpoints (wire contract §2.8): an organization's warm pools; the SDK's `warm_pool` service.

Listing needs no scope (like snapshots); making, resizing and deleting one need `write:snapshots` /
`delete:snapshots`: a pool keeps sandboxes of a snapshot started. Another organization's pool is 404.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tidepool_api import warm_pools
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context, SnapshotDeleter, SnapshotWriter
from tidepool_api.schemas import (
    CreateWarmPoolRequest,
    UpdateWarmPoolRequest,
    WarmPoolDto,
    error_responses,
    warm_pool_dto,
)

router = APIRouter(prefix="/warm-pools", tags=["warm-pools"], responses=error_responses(401))


@router.get("", response_model=list[WarmPoolDto])
async def list_warm_pools(context: Context, caller: Caller) -> JsonResponse:
    pools = await warm_pools.list_pools(context, caller.organization_id)
    return JsonResponse([warm_pool_dto(pool, size) for pool, size in pools])


@router.post("", status_code=201, response_model=WarmPoolDto, responses=error_responses(400, 409))
async def create_warm_pool(
    context: Context, caller: SnapshotWriter, request: CreateWarmPoolRequest
) -> JsonResponse:
    pool, size = await warm_pools.create_pool(
        context, caller.organization_id, request.snapshot, request.pool, request.target
    )
    return JsonResponse(warm_pool_dto(pool, size), status_code=201)


@router.patch("/{warm_pool_id}", response_model=WarmPoolDto, responses=error_responses(400, 404))
async def update_warm_pool(
    context: Context, caller: SnapshotWriter, warm_pool_id: str, request: UpdateWarmPoolRequest
) -> JsonResponse:
    pool, size = await warm_pools.update_pool(context, caller.organization_id, warm_pool_id, request.pool)
    return JsonResponse(warm_pool_dto(pool, size))


@router.delete("/{warm_pool_id}", status_code=204, responses=error_responses(400, 404))
async def delete_warm_pool(context: Context, caller: SnapshotDeleter, warm_pool_id: str) -> Response:
    await warm_pools.delete_pool(context, caller.organization_id, warm_pool_id)
    return Response(status_code=204)
