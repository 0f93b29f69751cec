"""`/sandbox` endpoints, with the exact status codes SDK 0.226.1 expects (see the wire contract §2.2)."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from tidepool_api import sandboxes
from tidepool_api.buildlogs import stream_build_log
from tidepool_api.db import Sandbox
from tidepool_api.errors import bad_request, describe_validation_error
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context
from tidepool_api.sandbox_events import list_events
from tidepool_api.schemas import CreateSandboxRequest, ReplaceLabelsRequest, sandbox_dto
from tidepool_contracts.states import SandboxState

ModelT = TypeVar("ModelT", bound=BaseModel)
router = APIRouter(prefix="/sandbox", tags=["sandbox"])

AFTER_START = {SandboxState.STARTED, SandboxState.ERROR, SandboxState.BUILD_FAILED}
AFTER_STOP = {SandboxState.STOPPED, SandboxState.ERROR}
AFTER_DELETE = {SandboxState.DESTROYED, SandboxState.ERROR}


def dto(context: Context, sandbox: Any) -> dict[str, object]:
    return sandbox_dto(sandbox, context.settings.toolbox_proxy_url)


async def json_body(request: Request, model: type[ModelT]) -> ModelT:
    """Parse the body whatever its Content-Type (some clients omit it); every failure is a clear 400."""
    raw = await request.body()
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as error:
        raise bad_request(f"request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise bad_request(describe_validation_error(RequestValidationError(error.errors()))) from error


@router.post("", status_code=200)
async def create_sandbox(context: Context, caller: Caller, request: Request) -> JsonResponse:
    body = await json_body(request, CreateSandboxRequest)
    sandbox = await sandboxes.create_sandbox(context, caller.organization_id, body)
    return JsonResponse(dto(context, sandbox))


@router.get("")
async def list_sandboxes(
    context: Context,
    caller: Caller,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 100,
    labels: str | None = None,
    states: Annotated[list[str] | None, Query()] = None,
    name: str | None = None,
    id: str | None = None,
) -> JsonResponse:
    label_filter: dict[str, str] | None = None
    if labels:
        try:
            label_filter = orjson.loads(labels)
        except orjson.JSONDecodeError as error:
            raise bad_request("labels must be a JSON object of strings") from error
        if not isinstance(label_filter, dict):
            raise bad_request("labels must be a JSON object of strings")
    items, next_cursor = await sandboxes.list_sandboxes(
        context,
        caller.organization_id,
        cursor=cursor,
        limit=limit,
        labels=label_filter,
        states=states,
        name_prefix=name,
        id_prefix=id,
    )
    return JsonResponse({"items": [dto(context, item) for item in items], "nextCursor": next_cursor})


@router.get("/{sandbox_id_or_name}")
async def get_sandbox(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    return JsonResponse(dto(context, sandbox))


@router.delete("/{sandbox_id_or_name}")
async def delete_sandbox(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    sandbox = await sandboxes.delete_sandbox(context, caller.organization_id, sandbox_id_or_name)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_DELETE, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/start")
async def start_sandbox(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    sandbox = await sandboxes.start_sandbox(context, caller.organization_id, sandbox_id_or_name)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_START, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/stop")
async def stop_sandbox(
    context: Context, caller: Caller, sandbox_id_or_name: str, force: bool = False
) -> JsonResponse:
    sandbox = await sandboxes.stop_sandbox(context, caller.organization_id, sandbox_id_or_name, force)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_STOP, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.put("/{sandbox_id_or_name}/labels")
async def replace_labels(
    context: Context, caller: Caller, sandbox_id_or_name: str, request: Request
) -> JsonResponse:
    body = await json_body(request, ReplaceLabelsRequest)
    labels = await sandboxes.replace_labels(context, caller.organization_id, sandbox_id_or_name, body.labels)
    return JsonResponse({"labels": labels})


@router.get("/{sandbox_id_or_name}/toolbox-proxy-url")
async def toolbox_proxy_url(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    return JsonResponse({"url": context.settings.toolbox_proxy_url})


INTERVAL_FIELDS = {
    "autostop": "auto_stop_interval",
    "autoarchive": "auto_archive_interval",
    "autodelete": "auto_delete_interval",
}


@router.post("/{sandbox_id_or_name}/{kind}/{minutes}")
async def set_interval(
    context: Context, caller: Caller, sandbox_id_or_name: str, kind: str, minutes: int
) -> JsonResponse:
    field_name = INTERVAL_FIELDS.get(kind)
    if field_name is None:
        return JsonResponse(
            status_code=404,
            content={"statusCode": 404, "message": f"Cannot POST /api/sandbox/{sandbox_id_or_name}/{kind}"},
        )
    sandbox = await sandboxes.set_interval(
        context, caller.organization_id, sandbox_id_or_name, field_name, minutes
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id}/last-activity", status_code=201)
async def update_last_activity(context: Context, caller: Caller, sandbox_id: str) -> Response:
    await sandboxes.touch_activity(context, caller.organization_id, sandbox_id)
    return Response(status_code=201)


@router.get("/{sandbox_id_or_name}/build-logs-url")
async def build_logs_url(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    if sandbox.build_ref is None:
        raise bad_request(f"Sandbox {sandbox.id} was not built from an image")
    return JsonResponse(
        {"url": f"{context.settings.effective_public_api_url}/sandbox/{sandbox.id}/build-logs"}
    )


@router.get("/{sandbox_id_or_name}/build-logs")
async def build_logs(
    context: Context, caller: Caller, sandbox_id_or_name: str, follow: bool = False
) -> Response:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    if sandbox.build_ref is None:
        raise bad_request(f"Sandbox {sandbox.id} was not built from an image")

    async def finished() -> bool:
        async with context.database.sessions() as session:
            row = await session.get(Sandbox, sandbox.id)
        return row is None or row.state not in (SandboxState.PENDING_BUILD, SandboxState.BUILDING_SNAPSHOT)

    return StreamingResponse(
        stream_build_log(context.bus, sandbox.build_ref, follow, finished), media_type="text/plain"
    )


@router.get("/{sandbox_id_or_name}/events")
async def sandbox_events(
    context: Context,
    caller: Caller,
    sandbox_id_or_name: str,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> JsonResponse:
    """State changes and abnormal process endings (signal, timeout, OOM kill), newest first (an extension)."""
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    return JsonResponse(await list_events(context, sandbox.id, limit))
