"""Lifecycle timers (behaviour spec "sandboxes", intervals in minutes; issue #10 "Idle timers").

- auto-stop: a started sandbox whose desired state is `started` stops after `auto_stop_interval` minutes
  without activity (0: never). Activity = toolbox use (the runner's activity bucket), a state change (its
  route), or a new desired state (a user's start, resize, interval change). Reading the sandbox through the
  API (`GET /sandbox/{id}` polling) is not activity.
- auto-delete: a stopped sandbox whose desired state is `stopped` is deleted `auto_delete_interval` minutes
  after it stopped (-1: never; 0: as soon as it stops, i.e. an ephemeral sandbox).
- auto-archive: a stopped sandbox whose desired state is `stopped` is archived `auto_archive_interval`
  minutes after it stopped (the API stores Daytona's 0 as the maximum, 30 days; 0 here: never). A due
  auto-delete goes first.

The platform acts as a user would: a new intent id in the desired record, the job to the sandbox's runner,
and a state event whose `cause` says why, so the API records who did it and the SDK's live events carry it.
One "minute" lasts `lifecycle_minute_seconds` (60; a test stack shortens it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import DesiredSandbox, SandboxAction, SandboxActivity, SandboxRoute
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import KeyValue, kv_items
from tidepool_scheduler.scheduler import Scheduler

log = structlog.get_logger("tidepool.scheduler.lifecycle")

AUTO_STOP = "auto_stop"
AUTO_DELETE = "auto_delete"
AUTO_ARCHIVE = "auto_archive"


def due(
    desired: DesiredSandbox, route: SandboxRoute, activity: datetime | None, now: datetime, minute: float
) -> str | None:
    """Which timer has fired for this sandbox (AUTO_STOP, AUTO_DELETE, AUTO_ARCHIVE) or None. Pure."""
    if (
        desired.desired_state == DesiredState.STARTED
        and route.state == SandboxState.STARTED
        and desired.auto_stop_interval > 0
    ):
        last = max(
            moment for moment in (desired.updated_at, route.updated_at, activity) if moment is not None
        )
        if (now - last).total_seconds() >= desired.auto_stop_interval * minute:
            return AUTO_STOP
    if (
        desired.desired_state == DesiredState.STOPPED
        and route.state == SandboxState.STOPPED
        and desired.auto_delete_interval >= 0
    ):
        stopped_for = (now - max(route.updated_at, desired.updated_at)).total_seconds()
        if stopped_for >= desired.auto_delete_interval * minute:
            return AUTO_DELETE
    if (
        desired.desired_state == DesiredState.STOPPED
        and route.state == SandboxState.STOPPED
        and desired.auto_archive_interval > 0
    ):
        stopped_for = (now - max(route.updated_at, desired.updated_at)).total_seconds()
        if stopped_for >= desired.auto_archive_interval * minute:
            return AUTO_ARCHIVE
    return None


class LifecycleTimers:
    def __init__(self, scheduler: Scheduler, activity_kv: KeyValue) -> None:
        self.scheduler = scheduler
        self.activity_kv = activity_kv

    @classmethod
    async def create(cls, scheduler: Scheduler) -> LifecycleTimers:
        return cls(scheduler, await scheduler.bus.kv(channels.ACTIVITY))

    async def tick(self, now: datetime | None = None) -> list[tuple[str, str]]:
        """Act on every timer that has fired; returns [(sandbox id, timer)]."""
        now = now or datetime.now(UTC)
        minute = self.scheduler.settings.lifecycle_minute_seconds
        activity = {
            record.sandbox_id: record.last_activity_at
            for record in await kv_items(self.activity_kv, SandboxActivity)
        }
        # One read of each bucket per tick, not one request per sandbox.
        routes = {route.sandbox_id: route for route in await kv_items(self.scheduler.routes_kv, SandboxRoute)}
        acted: list[tuple[str, str]] = []
        for desired in await kv_items(self.scheduler.desired_kv, DesiredSandbox):
            route = routes.get(desired.sandbox_id)
            if route is None:
                continue
            timer = due(desired, route, activity.get(desired.sandbox_id), now, minute)
            if timer == AUTO_STOP:
                await self.scheduler.lifecycle_change(
                    desired, SandboxAction.STOP, DesiredState.STOPPED, SandboxState.STOPPING, AUTO_STOP
                )
            elif timer == AUTO_DELETE:
                await self.scheduler.lifecycle_change(
                    desired,
                    SandboxAction.DESTROY,
                    DesiredState.DESTROYED,
                    SandboxState.DESTROYING,
                    AUTO_DELETE,
                )
            elif timer == AUTO_ARCHIVE:
                await self.scheduler.lifecycle_change(
                    desired,
                    SandboxAction.ARCHIVE,
                    DesiredState.ARCHIVED,
                    SandboxState.ARCHIVING,
                    AUTO_ARCHIVE,
                )
            if timer is not None:
                log.info("lifecycle.fired", sandbox_id=desired.sandbox_id, timer=timer)
                acted.append((desired.sandbox_id, timer))
        return acted

    async def run_forever(self, stop: asyncio.Event, leading: Callable[[], bool] = lambda: True) -> None:
        """Tick every `lifecycle_tick_seconds` while `leading()` (the replica holds the lease)."""
        while not stop.is_set():
            try:
                if leading():
                    await self.tick()
            except Exception as error:
                log.exception("lifecycle.tick_failed", error=str(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.scheduler.settings.lifecycle_tick_seconds)
