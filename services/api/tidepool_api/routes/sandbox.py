"""`/sandbox` endpoints, with the exact status codes SDK 0.226.1 expects (see the wire contract §2.2)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import Response, StreamingResponse

from tidepool_api import sandboxes
from tidepool_api.buildlogs import stream_build_log
from tidepool_api.db import WARM_POOL_ORGANIZATION_ID, Sandbox
from tidepool_api.errors import bad_request, not_found
from tidepool_api.organizations import is_admin
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context, SandboxDeleter, SandboxSnapshotWriter, SandboxWriter
from tidepool_api.sandbox_events import list_events
from tidepool_api.schemas import (
    INT32_MAX,
    LABEL_KEY_MAX,
    LABEL_VALUE_MAX,
    LABELS_MAX_ENTRIES,
    NAME_MAX,
    QUERY_TEXT_MAX,
    TEXT_PLAIN,
    CreateSandboxRequest,
    CreateSandboxSnapshotRequest,
    ForkSandboxRequest,
    ListSandboxesDto,
    ReplaceLabelsRequest,
    ResizeSandboxRequest,
    SandboxDto,
    SandboxEventDto,
    SandboxLabelsDto,
    SandboxStateFilter,
    UpdateSandboxNetworkSettingsRequest,
    UrlDto,
    error_responses,
    sandbox_dto,
)
from tidepool_contracts.states import SandboxState

router = APIRouter(prefix="/sandbox", tags=["sandbox"], responses=error_responses(401))
READ = error_responses(400, 404)
WRITE = error_responses(400, 404, 409, 413)

AFTER_START = {SandboxState.STARTED, SandboxState.ERROR, SandboxState.BUILD_FAILED}
AFTER_STOP = {SandboxState.STOPPED, SandboxState.ERROR}
AFTER_RESIZE = {SandboxState.STARTED, SandboxState.STOPPED, SandboxState.ERROR}
AFTER_DELETE = {SandboxState.DESTROYED, SandboxState.ERROR}
SNAPSHOT_WAIT_SECONDS = 50.0
AFTER_ARCHIVE = {SandboxState.ARCHIVED, SandboxState.STOPPED, SandboxState.ERROR}


def dto(context: Context, sandbox: Any) -> dict[str, object]:
    return sandbox_dto(sandbox, context.settings.toolbox_proxy_url)


@router.post("", status_code=200, response_model=SandboxDto, responses=error_responses(400, 409, 413, 503))
async def create_sandbox(
    context: Context, caller: SandboxWriter, body: Annotated[CreateSandboxRequest | None, Body()] = None
) -> JsonResponse:
    """Create a sandbox (`{}` is valid) and wait up to `create_wait_seconds` for it to start (§2.2)."""
    sandbox = await sandboxes.create_sandbox(context, caller.organization_id, body or CreateSandboxRequest())
    return JsonResponse(dto(context, sandbox))


def parse_label_filter(labels: str) -> dict[str, str]:
    """`labels` of `GET /sandbox`: a JSON object of strings, bounded like the labels themselves."""
    try:
        label_filter = orjson.loads(labels)
    except orjson.JSONDecodeError as error:
        raise bad_request("labels: must be a JSON object of strings") from error
    if not isinstance(label_filter, dict) or not all(isinstance(v, str) for v in label_filter.values()):
        raise bad_request("labels: must be a JSON object of strings")
    if len(label_filter) > LABELS_MAX_ENTRIES:
        raise bad_request(f"labels: at most {LABELS_MAX_ENTRIES} labels")
    for key, value in label_filter.items():
        if len(key) > LABEL_KEY_MAX or len(value) > LABEL_VALUE_MAX:
            raise bad_request(
                f"labels: keys are at most {LABEL_KEY_MAX}, values {LABEL_VALUE_MAX} characters"
            )
    return label_filter


@router.get("", response_model=ListSandboxesDto, responses=error_responses(400))
async def list_sandboxes(
    context: Context,
    caller: Caller,
    cursor: Annotated[str | None, Query(max_length=QUERY_TEXT_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 100,
    labels: Annotated[str | None, Query(max_length=16 * 1024, description="JSON object of labels")] = None,
    states: Annotated[list[SandboxStateFilter] | None, Query()] = None,
    name: Annotated[str | None, Query(max_length=NAME_MAX, description="name prefix")] = None,
    id: Annotated[str | None, Query(max_length=NAME_MAX, description="ID prefix")] = None,
    include_warm: Annotated[
        bool,
        Query(
            alias="includeWarm",
            description="admin organization only: the unclaimed warm-pool sandboxes too (warmPoolId set)",
        ),
    ] = False,
) -> JsonResponse:
    label_filter = parse_label_filter(labels) if labels else None
    owners = [caller.organization_id]
    if include_warm and await is_admin(context, caller.organization_id):
        owners.append(WARM_POOL_ORGANIZATION_ID)  # they belong to no tenant; only the operator sees them
    items, next_cursor = await sandboxes.list_sandboxes(
        context,
        owners,
        cursor=cursor,
        limit=limit,
        labels=label_filter,
        states=[state.value for state in states] if states else None,
        name_prefix=name,
        id_prefix=id,
    )
    return JsonResponse({"items": [dto(context, item) for item in items], "nextCursor": next_cursor})


@router.get("/{sandbox_id_or_name}", response_model=SandboxDto, responses=READ)
async def get_sandbox(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    return JsonResponse(dto(context, sandbox))


@router.delete("/{sandbox_id_or_name}", response_model=SandboxDto, responses=WRITE)
async def delete_sandbox(context: Context, caller: SandboxDeleter, sandbox_id_or_name: str) -> JsonResponse:
    sandbox = await sandboxes.delete_sandbox(context, caller.organization_id, sandbox_id_or_name)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_DELETE, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/start", response_model=SandboxDto, responses=WRITE)
async def start_sandbox(context: Context, caller: SandboxWriter, sandbox_id_or_name: str) -> JsonResponse:
    sandbox = await sandboxes.start_sandbox(context, caller.organization_id, sandbox_id_or_name)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_START, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/stop", response_model=SandboxDto, responses=WRITE)
async def stop_sandbox(
    context: Context, caller: SandboxWriter, sandbox_id_or_name: str, force: bool = False
) -> JsonResponse:
    sandbox = await sandboxes.stop_sandbox(context, caller.organization_id, sandbox_id_or_name, force)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_STOP, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/recover", response_model=SandboxDto, responses=WRITE)
async def recover_sandbox(context: Context, caller: SandboxWriter, sandbox_id_or_name: str) -> JsonResponse:
    """Behaviour spec "Recover": from a recoverable `error` only (400 otherwise); waits for `started`."""
    sandbox = await sandboxes.recover_sandbox(context, caller.organization_id, sandbox_id_or_name)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_START, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/resize", response_model=SandboxDto, responses=WRITE)
async def resize_sandbox(
    context: Context, caller: SandboxWriter, sandbox_id_or_name: str, body: ResizeSandboxRequest
) -> JsonResponse:
    """Behaviour spec "Resize": started: cpu/memory may only grow (hot); stopped: cpu/memory, disk grows."""
    sandbox = await sandboxes.resize_sandbox(context, caller.organization_id, sandbox_id_or_name, body)
    if sandbox.state == SandboxState.RESIZING:
        sandbox = await sandboxes.wait_for_state(
            context, sandbox.id, AFTER_RESIZE, context.settings.create_wait_seconds
        )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/network-settings", response_model=SandboxDto, responses=WRITE)
async def update_network_settings(
    context: Context,
    caller: SandboxWriter,
    sandbox_id_or_name: str,
    body: UpdateSandboxNetworkSettingsRequest,
) -> JsonResponse:
    """Behaviour spec §5: egress policy (block all, IPv4 CIDR and domain allow lists), applied by the
    runner on a running sandbox without a restart."""
    organization_id = caller.organization_id
    sandbox = await sandboxes.update_network_settings(context, organization_id, sandbox_id_or_name, body)
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/archive", response_model=SandboxDto, responses=WRITE)
async def archive_sandbox(context: Context, caller: SandboxWriter, sandbox_id_or_name: str) -> JsonResponse:
    """Behaviour spec "Archive": a stopped sandbox only (400 otherwise); waits for `archived`."""
    sandbox = await sandboxes.archive_sandbox(context, caller.organization_id, sandbox_id_or_name)
    sandbox = await sandboxes.wait_for_state(
        context, sandbox.id, AFTER_ARCHIVE, context.settings.create_wait_seconds
    )
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/snapshot", response_model=SandboxDto, responses=WRITE)
async def snapshot_sandbox(
    context: Context,
    caller: SandboxSnapshotWriter,
    sandbox_id_or_name: str,
    body: CreateSandboxSnapshotRequest,
) -> JsonResponse:
    """Snapshot from a sandbox: its filesystem becomes the snapshot `name` (waits until it is usable; a
    failure is a 400 with the reason). The sandbox keeps its state."""
    if body.include_memory:
        raise bad_request("memory snapshots are for VM sandboxes; this sandbox is a container")
    snapshot = await sandboxes.snapshot_sandbox(
        context, caller.organization_id, sandbox_id_or_name, body.name
    )
    # Committing and pushing takes a while: wait for it within the SDK's 60 s default, then answer anyway
    # (the snapshot turns `active` by itself; `GET /snapshots/{name}` tells).
    snapshot = await sandboxes.wait_for_snapshot(
        context, snapshot.id, max(context.settings.create_wait_seconds, SNAPSHOT_WAIT_SECONDS)
    )
    if snapshot.state not in ("active", "pending"):
        raise bad_request(
            f"Snapshot {snapshot.name} is '{snapshot.state}'"
            + (f": {snapshot.error_reason}" if snapshot.error_reason else "")
        )
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    return JsonResponse(dto(context, sandbox))


@router.post("/{sandbox_id_or_name}/fork", response_model=SandboxDto, responses=WRITE)
async def fork_sandbox(
    context: Context,
    caller: SandboxWriter,
    sandbox_id_or_name: str,
    body: Annotated[ForkSandboxRequest | None, Body()] = None,
) -> JsonResponse:
    """Fork: a new, independent sandbox with a copy of this one's filesystem (waits for it to start)."""
    sandbox = await sandboxes.fork_sandbox(
        context, caller.organization_id, sandbox_id_or_name, (body or ForkSandboxRequest()).name
    )
    return JsonResponse(dto(context, sandbox))


@router.get("/{sandbox_id_or_name}/forks", response_model=list[SandboxDto], responses=READ)
async def sandbox_forks(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    """The sandbox's forks that are not deleted (its direct children in the fork tree)."""
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
        forks = await sandboxes.live_forks(session, sandbox)
    return JsonResponse([dto(context, fork) for fork in forks])


@router.get("/{sandbox_id_or_name}/parent", response_model=SandboxDto, responses=READ)
async def sandbox_parent(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    """The sandbox this one was forked from (404 for one that is not a fork, or whose parent is gone)."""
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
        if sandbox.parent_id is None:
            raise not_found(f"Sandbox {sandbox.id} is not a fork")
        parent = await sandboxes.find_sandbox(session, caller.organization_id, sandbox.parent_id)
    return JsonResponse(dto(context, parent))


@router.put("/{sandbox_id_or_name}/labels", response_model=SandboxLabelsDto, responses=WRITE)
async def replace_labels(
    context: Context, caller: SandboxWriter, sandbox_id_or_name: str, body: ReplaceLabelsRequest
) -> JsonResponse:
    labels = await sandboxes.replace_labels(context, caller.organization_id, sandbox_id_or_name, body.labels)
    return JsonResponse({"labels": labels})


@router.get("/{sandbox_id_or_name}/toolbox-proxy-url", response_model=UrlDto, responses=READ)
async def toolbox_proxy_url(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    return JsonResponse({"url": context.settings.toolbox_proxy_url})


INTERVAL_FIELDS = {
    "autostop": "auto_stop_interval",
    "autoarchive": "auto_archive_interval",
    "autodelete": "auto_delete_interval",
}


@router.post("/{sandbox_id_or_name}/{kind}/{minutes}", response_model=SandboxDto, responses=WRITE)
async def set_interval(
    context: Context,
    caller: SandboxWriter,
    sandbox_id_or_name: str,
    kind: str,
    minutes: Annotated[int, Path(le=INT32_MAX, description="minutes; -1 disables autodelete")],
) -> JsonResponse:
    """`autostop`, `autoarchive` or `autodelete` in minutes (0 disables autostop; 0 is the maximum for
    autoarchive; -1 disables autodelete, 0 deletes on stop)."""
    field_name = INTERVAL_FIELDS.get(kind)
    if field_name is None:
        raise not_found(f"Cannot POST /api/sandbox/{sandbox_id_or_name}/{kind}")
    sandbox = await sandboxes.set_interval(
        context, caller.organization_id, sandbox_id_or_name, field_name, minutes
    )
    return JsonResponse(dto(context, sandbox))


@router.post(
    "/{sandbox_id}/last-activity", status_code=201, response_class=Response, responses=error_responses(404)
)
async def update_last_activity(context: Context, caller: SandboxWriter, sandbox_id: str) -> Response:
    await sandboxes.touch_activity(context, caller.organization_id, sandbox_id)
    return Response(status_code=201)


@router.get("/{sandbox_id_or_name}/build-logs-url", response_model=UrlDto, responses=READ)
async def build_logs_url(context: Context, caller: Caller, sandbox_id_or_name: str) -> JsonResponse:
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    if sandbox.build_ref is None:
        raise bad_request(f"Sandbox {sandbox.id} was not built from an image")
    return JsonResponse(
        {"url": f"{context.settings.effective_public_api_url}/sandbox/{sandbox.id}/build-logs"}
    )


@router.get(
    "/{sandbox_id_or_name}/build-logs", response_class=StreamingResponse, responses={200: TEXT_PLAIN, **READ}
)
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


@router.get("/{sandbox_id_or_name}/events", response_model=list[SandboxEventDto], responses=READ)
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
