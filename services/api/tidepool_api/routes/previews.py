"""Preview URLs (wire contract §1.9, §2.2): `GET /sandbox/{id}/ports/{port}/preview-url`, signed preview URLs
and their early expiry, and `POST /sandbox/{id}/public/{isPublic}`.

The proxy serves the URLs; this only hands them out and mirrors who may open them (tidepool_api.previews).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from sqlalchemy import and_, update
from sqlmodel import col

from tidepool_api import previews, sandboxes
from tidepool_api.db import Sandbox
from tidepool_api.errors import ApiError, bad_request, not_found
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Context, SandboxWriter
from tidepool_api.schemas import SandboxDto, WireModel, error_responses, sandbox_dto

router = APIRouter(prefix="/sandbox", tags=["preview"], responses=error_responses(400, 401, 404))

Port = Annotated[int, Path(ge=1, le=65535, description="port inside the sandbox")]


class PortPreviewUrlDto(WireModel):
    sandbox_id: str
    url: str
    token: str


class SignedPortPreviewUrlDto(WireModel):
    sandbox_id: str
    port: int
    token: str
    url: str


@router.get("/{sandbox_id_or_name}/ports/{port}/preview-url", response_model=PortPreviewUrlDto)
async def get_port_preview_url(
    context: Context, caller: SandboxWriter, sandbox_id_or_name: str, port: Port
) -> JsonResponse:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
        if sandbox.preview_token is None:  # a sandbox from before previews existed
            await session.exec(  # type: ignore[call-overload]
                update(Sandbox)
                .where(and_(col(Sandbox.id) == sandbox.id, col(Sandbox.preview_token).is_(None)))
                .values(preview_token=previews.new_preview_token())
            )
            await session.commit()
            await session.refresh(sandbox)
    token = sandbox.preview_token
    if token is None:  # pragma: no cover - the row vanished meanwhile
        raise not_found(f"Sandbox with ID or name {sandbox_id_or_name} not found")
    await _mirrored(context, sandbox)
    url = context.settings.preview_url(port, sandbox.id)
    return JsonResponse({"sandboxId": sandbox.id, "url": url, "token": token})


@router.get("/{sandbox_id_or_name}/ports/{port}/signed-preview-url", response_model=SignedPortPreviewUrlDto)
async def get_signed_port_preview_url(
    context: Context,
    caller: SandboxWriter,
    sandbox_id_or_name: str,
    port: Port,
    expires_in_seconds: Annotated[int | None, Query(alias="expiresInSeconds")] = None,
) -> JsonResponse:
    """A URL that opens the preview without any header, for `expiresInSeconds` (1 s to 24 h, default 60)."""
    seconds = previews.SIGNED_DEFAULT_SECONDS if expires_in_seconds is None else expires_in_seconds
    if not 1 <= seconds <= previews.SIGNED_MAX_SECONDS:
        raise bad_request(f"expiresInSeconds must be between 1 and {previews.SIGNED_MAX_SECONDS}")
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    await _mirrored(context, sandbox)
    try:
        token = await previews.sign(context, sandbox, port, seconds)
    except Exception as error:
        raise ApiError(503, "preview signing is temporarily unavailable; retry") from error
    url = context.settings.preview_url(port, token)
    return JsonResponse({"sandboxId": sandbox.id, "port": port, "token": token, "url": url})


@router.post(
    "/{sandbox_id_or_name}/ports/{port}/signed-preview-url/{token}/expire",
    status_code=200,
    response_class=Response,
)
async def expire_signed_port_preview_url(
    context: Context, caller: SandboxWriter, sandbox_id_or_name: str, port: Port, token: str
) -> Response:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    if not await previews.expire_signed(context, sandbox, port, token):
        raise not_found(f"Signed preview URL for port {port} of sandbox {sandbox.id} not found")
    return Response(status_code=200)


@router.post("/{sandbox_id_or_name}/public/{is_public}", response_model=SandboxDto)
async def update_public_status(
    context: Context, caller: SandboxWriter, sandbox_id_or_name: str, is_public: bool
) -> JsonResponse:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
        sandbox.public = is_public
        session.add(sandbox)
        await session.commit()
        await session.refresh(sandbox)
    await _mirrored(context, sandbox, force=True)
    return JsonResponse(sandbox_dto(sandbox, context.settings.toolbox_proxy_url))


async def _mirrored(context: Context, sandbox: Sandbox, *, force: bool = False) -> None:
    try:
        if force:
            await previews.publish_access(context, sandbox)
        else:
            await previews.ensure_access(context, sandbox)
    except Exception as error:
        raise ApiError(503, "preview access is temporarily unavailable; retry") from error
