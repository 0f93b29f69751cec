"""The admin's view of the runners and their cordons (`/runners` routes; issue #10 "Runner loss").

A runner is known from its heartbeat (KV `tidepool_runners`, gone 30 s after its last one) or from an
admin's decision about it (KV `tidepool_runner_controls`, kept until changed). The scheduler reads the
same two: a cordoned or draining runner gets no new placements; one silent for longer than
`runner_lost_after_seconds` is lost (`unresponsive` here) and its sandboxes are in a recoverable `error`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tidepool_api.context import ApiContext
from tidepool_api.errors import not_found
from tidepool_contracts import channels
from tidepool_contracts.models import RunnerControl, RunnerInfo
from tidepool_runtime.broker import KeyValue, kv_get, kv_items, kv_put

# What a KV key may be (a runner's id is its heartbeat's key): anything else names no runner.
RUNNER_ID_PATTERN = re.compile(r"[-_=A-Za-z0-9]+(\.[-_=A-Za-z0-9]+)*")
READY = "ready"
UNRESPONSIVE = "unresponsive"


@dataclass(frozen=True)
class RunnerView:
    """One runner as the admin sees it: `info` None when its heartbeat entry expired; `state` `ready` or
    `unresponsive` (lost); `draining` until it hosts no sandbox, then `drained`."""

    runner_id: str
    info: RunnerInfo | None
    control: RunnerControl
    state: str

    @property
    def unschedulable(self) -> bool:
        reported = self.info is not None and self.info.unschedulable
        return reported or self.control.cordoned or self.control.draining or self.state != READY

    @property
    def drained(self) -> bool:
        return self.control.draining and self.info is not None and self.info.sandboxes_total == 0


async def _runners_kv(context: ApiContext) -> KeyValue:
    if context.runners_kv is None:
        context.runners_kv = await context.bus.kv(channels.RUNNERS)
    return context.runners_kv


async def _controls_kv(context: ApiContext) -> KeyValue:
    if context.runner_controls_kv is None:
        context.runner_controls_kv = await context.bus.kv(channels.RUNNER_CONTROLS)
    return context.runner_controls_kv


def _view(
    context: ApiContext, runner_id: str, info: RunnerInfo | None, control: RunnerControl | None
) -> RunnerView:
    lost_after = timedelta(seconds=context.settings.runner_lost_after_seconds)
    alive = info is not None and datetime.now(UTC) - info.heartbeat_at <= lost_after
    return RunnerView(
        runner_id=runner_id,
        info=info,
        control=control or RunnerControl(runner_id=runner_id),
        state=READY if alive else UNRESPONSIVE,
    )


async def list_runners(context: ApiContext) -> list[RunnerView]:
    """Every runner with a heartbeat entry or an admin's decision, by id."""
    infos = {info.runner_id: info for info in await kv_items(await _runners_kv(context), RunnerInfo)}
    controls = {
        control.runner_id: control for control in await kv_items(await _controls_kv(context), RunnerControl)
    }
    return [
        _view(context, runner_id, infos.get(runner_id), controls.get(runner_id))
        for runner_id in sorted(set(infos) | set(controls))
    ]


async def get_runner(context: ApiContext, runner_id: str) -> RunnerView:
    """404 for a runner with neither a heartbeat entry nor an admin's decision."""
    if len(runner_id) > 255 or not RUNNER_ID_PATTERN.fullmatch(runner_id):
        raise not_found(f"Runner {runner_id} not found")
    info = await kv_get(await _runners_kv(context), runner_id, RunnerInfo)
    control = await kv_get(await _controls_kv(context), runner_id, RunnerControl)
    if info is None and control is None:
        raise not_found(f"Runner {runner_id} not found")
    return _view(context, runner_id, info, control)


async def set_control(context: ApiContext, runner_id: str, *, cordoned: bool, draining: bool) -> RunnerView:
    """Record the admin's decision (cordon: `cordoned`; drain: both; uncordon: neither); 404 as
    `get_runner`. Takes effect at the scheduler's next placement."""
    current = await get_runner(context, runner_id)
    control = RunnerControl(runner_id=runner_id, cordoned=cordoned, draining=draining)
    await kv_put(await _controls_kv(context), runner_id, control)
    return _view(context, runner_id, current.info, control)
