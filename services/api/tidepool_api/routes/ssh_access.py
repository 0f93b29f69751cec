"""SSH access (wire contract §2.2): `POST`/`DELETE /sandbox/{id}/ssh-access` and
`GET /sandbox/ssh-access/validate`. The SSH gateway serves the tokens (tidepool_ssh_gateway); this hands
them out, revokes them and mirrors them to its KV bucket (tidepool_api.ssh_access)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from tidepool_api import sandboxes, ssh_access
from tidepool_api.db import Sandbox
from tidepool_api.errors import ApiError, bad_request
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context, SandboxWriter
from tidepool_api.schemas import SandboxDto, WireModel, error_responses, iso, sandbox_dto

router = APIRouter(prefix="/sandbox", tags=["sandbox"], responses=error_responses(400, 401, 404))


class SshAccessDto(WireModel):
    id: str
    sandbox_id: str
    token: str
    expires_at: str
    created_at: str
    updated_at: str
    ssh_command: str


class SshAccessValidationDto(WireModel):
    valid: bool
    sandbox_id: str


# Before `/{id}` routes: `ssh-access` is not a sandbox id.
@router.get("/ssh-access/validate", response_model=SshAccessValidationDto)
async def validate_ssh_access(
    context: Context, caller: Caller, token: Annotated[str, Query(max_length=256)]
) -> JsonResponse:
    """`valid` only for an unexpired, unrevoked token of one of the caller's sandboxes."""
    async with context.database.sessions() as session:
        access = await ssh_access.find(session, token)
        sandbox = None if access is None else await session.get(Sandbox, access.sandbox_id)
    if access is None or sandbox is None or sandbox.organization_id != caller.organization_id:
        return JsonResponse({"valid": False, "sandboxId": ""})
    return JsonResponse(
        {"valid": ssh_access.is_valid(access, datetime.now(UTC)), "sandboxId": access.sandbox_id}
    )


@router.post("/{sandbox_id_or_name}/ssh-access", response_model=SshAccessDto)
async def create_ssh_access(
    context: Context,
    caller: SandboxWriter,
    sandbox_id_or_name: str,
    expires_in_minutes: Annotated[int | None, Query(alias="expiresInMinutes")] = None,
) -> JsonResponse:
    minutes = ssh_access.DEFAULT_MINUTES if expires_in_minutes is None else expires_in_minutes
    if not 1 <= minutes <= ssh_access.MAX_MINUTES:
        raise bad_request(f"expiresInMinutes must be between 1 and {ssh_access.MAX_MINUTES}")
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
        try:
            access, token = await ssh_access.create(context, session, sandbox, minutes)
        except ApiError:
            raise
        except Exception as error:
            raise ApiError(503, "SSH access is temporarily unavailable; retry") from error
    return JsonResponse(
        {
            "id": access.id,
            "sandboxId": access.sandbox_id,
            "token": token,
            "expiresAt": iso(access.expires_at),
            "createdAt": iso(access.created_at),
            "updatedAt": iso(access.updated_at),
            "sshCommand": context.settings.ssh_command(token),
        }
    )


@router.delete("/{sandbox_id_or_name}/ssh-access", response_model=SandboxDto)
async def revoke_ssh_access(
    context: Context,
    caller: SandboxWriter,
    sandbox_id_or_name: str,
    token: Annotated[str | None, Query(max_length=256)] = None,
) -> JsonResponse:
    """Revoke one token, or every token of the sandbox when none is given; the gateway refuses it at once."""
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
        try:
            await ssh_access.revoke(context, session, sandbox.id, token)
        except Exception as error:
            raise ApiError(503, "SSH access is temporarily unavailable; retry") from error
    return JsonResponse(sandbox_dto(sandbox, context.settings.toolbox_proxy_url))
