"""`/runners`: the admin organization's view of the runners, and cordon / drain / uncordon (issue #10).

Admin organization only: any other organization gets 404, as if there were no such routes. Reading needs
`read:runners`, changing `write:runners`. Also Daytona's `PATCH /runners/{id}/scheduling`
(`{"unschedulable": bool}`) and `PATCH /runners/{id}/draining` (`{"draining": bool}`).
- cordon: no new sandbox is placed on the runner; those it hosts keep running there;
- drain: cordoned, and `draining` until it hosts no sandbox (`drained`); nothing is moved automatically:
  the admin stops, archives or deletes what it hosts;
- uncordon: schedulable again (ends a drain too).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from tidepool_api import organizations, runners
from tidepool_api.auth import Principal
from tidepool_api.errors import not_found
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Context, Requires
from tidepool_api.schemas import WireModel, error_responses, iso
from tidepool_contracts.permissions import Permission

router = APIRouter(prefix="/runners", tags=["runners"], responses=error_responses(401, 403, 404))

RunnerReader = Annotated[Principal, Requires(Permission.READ_RUNNERS)]
RunnerWriter = Annotated[Principal, Requires(Permission.WRITE_RUNNERS)]


class RunnerDto(WireModel):
    """Daytona's `Runner`, as far as Tidepool has it, plus the cordon and drain flags."""

    id: str
    name: str
    region: str | None
    api_url: str | None
    state: str
    """`ready`, or `unresponsive` when its heartbeats stopped (lost)."""
    unschedulable: bool
    """True when cordoned, draining, lost, or the runner reports it cannot take sandboxes."""
    cordoned: bool
    draining: bool
    drained: bool
    last_checked: str | None
    cpu: int | None
    memory: int | None
    current_allocated_cpu: int | None
    current_allocated_memory_gi_b: int | None
    current_started_sandboxes: int | None
    sandboxes: int | None


class SchedulingRequest(WireModel):
    unschedulable: bool


class DrainingRequest(WireModel):
    draining: bool


def runner_dto(view: runners.RunnerView) -> dict[str, object]:
    info = view.info
    return {
        "id": view.runner_id,
        "name": view.runner_id,
        "region": info.region if info else None,
        "apiUrl": info.url if info else None,
        "state": view.state,
        "unschedulable": view.unschedulable,
        "cordoned": view.control.cordoned or view.control.draining,
        "draining": view.control.draining and not view.drained,
        "drained": view.drained,
        "lastChecked": iso(info.heartbeat_at) if info else None,
        "cpu": info.cpu_total if info else None,
        "memory": info.memory_total_gib if info else None,
        "currentAllocatedCpu": info.cpu_allocated if info else None,
        "currentAllocatedMemoryGiB": info.memory_allocated_gib if info else None,
        "currentStartedSandboxes": info.sandboxes_running if info else None,
        "sandboxes": info.sandboxes_total if info else None,
    }


async def _admin_only(context: Context, caller: Principal) -> None:
    if not await organizations.is_admin(context, caller.organization_id):
        raise not_found("Not Found")


@router.get("", response_model=list[RunnerDto])
async def list_runners(context: Context, caller: RunnerReader) -> JsonResponse:
    await _admin_only(context, caller)
    return JsonResponse([runner_dto(view) for view in await runners.list_runners(context)])


@router.get("/{runner_id}", response_model=RunnerDto)
async def get_runner(context: Context, caller: RunnerReader, runner_id: str) -> JsonResponse:
    await _admin_only(context, caller)
    return JsonResponse(runner_dto(await runners.get_runner(context, runner_id)))


@router.post("/{runner_id}/cordon", response_model=RunnerDto)
async def cordon_runner(context: Context, caller: RunnerWriter, runner_id: str) -> JsonResponse:
    await _admin_only(context, caller)
    return JsonResponse(
        runner_dto(await runners.set_control(context, runner_id, cordoned=True, draining=False))
    )


@router.post("/{runner_id}/drain", response_model=RunnerDto)
async def drain_runner(context: Context, caller: RunnerWriter, runner_id: str) -> JsonResponse:
    await _admin_only(context, caller)
    return JsonResponse(
        runner_dto(await runners.set_control(context, runner_id, cordoned=True, draining=True))
    )


@router.post("/{runner_id}/uncordon", response_model=RunnerDto)
async def uncordon_runner(context: Context, caller: RunnerWriter, runner_id: str) -> JsonResponse:
    await _admin_only(context, caller)
    return JsonResponse(
        runner_dto(await runners.set_control(context, runner_id, cordoned=False, draining=False))
    )


@router.patch("/{runner_id}/scheduling", response_model=RunnerDto, responses=error_responses(400))
async def update_runner_scheduling(
    context: Context, caller: RunnerWriter, runner_id: str, body: SchedulingRequest
) -> JsonResponse:
    """Daytona's: `unschedulable` true cordons, false uncordons."""
    await _admin_only(context, caller)
    view = await runners.set_control(context, runner_id, cordoned=body.unschedulable, draining=False)
    return JsonResponse(runner_dto(view))


@router.patch("/{runner_id}/draining", response_model=RunnerDto, responses=error_responses(400))
async def update_runner_draining(
    context: Context, caller: RunnerWriter, runner_id: str, body: DrainingRequest
) -> JsonResponse:
    """Daytona's: `draining` true drains (and cordons), false ends the drain and the cordon."""
    await _admin_only(context, caller)
    view = await runners.set_control(context, runner_id, cordoned=body.draining, draining=body.draining)
    return JsonResponse(runner_dto(view))
