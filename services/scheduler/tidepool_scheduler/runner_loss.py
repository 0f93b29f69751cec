"""Runner loss (issue #10): a runner that stops sending heartbeats is lost until it sends them again.

Checked by the leading replica at every reconciliation. A runner is lost when its last heartbeat (KV
`tidepool_runners`) is older than `runner_lost_after_seconds`, or its entry expired (30 s without one),
while sandboxes are placed on it. Then:

- placement skips it (tidepool_scheduler.placement.schedulable applies the same age);
- each of its sandboxes that is not being deleted, archived or already in `error` gets a recoverable
  `error` whose errorReason names the runner and the silence, with cause `runner_lost` (so the live
  event and the webhook say why);
- once its heartbeats are fresh again it is schedulable again, and each of those sandboxes is sent the job
  of its desired state anew (`Scheduler.redo_desired`): the runner, which re-adopted its containers on
  start, converges and reports the actual state (`error` → `started` / `stopped`).

Nothing is restarted elsewhere yet: a sandbox's disk lives on its runner (archive first to move it).
The lost set lives in the leader's memory: after a failover the new leader finds a still-lost runner again
(the `error` events are idempotent); one that came back during the failover leaves its sandboxes in their
recoverable `error`, for `POST /sandbox/{id}/recover`. For `runner_lost_after_seconds` after it starts
checking, a replica judges no runner: runners restarted with the platform get time for a first heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import (
    DesiredSandbox,
    Placement,
    RunnerInfo,
    SandboxAction,
    SandboxRoute,
    SandboxStateEvent,
)
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import kv_get, kv_items
from tidepool_scheduler.scheduler import Scheduler

log = structlog.get_logger("tidepool.scheduler.runner_loss")

RUNNER_LOST = "runner_lost"
# Sandboxes in these (route) states are not affected by their runner's loss.
UNAFFECTED_STATES = frozenset(
    {SandboxState.ARCHIVED, SandboxState.DESTROYED, SandboxState.DESTROYING, SandboxState.ERROR}
)


def lost_reason(runner_id: str, seconds: float) -> str:
    return f"runner {runner_id} was lost: no heartbeat for more than {seconds:g} s"


@dataclass
class RunnerWatch:
    scheduler: Scheduler
    # runner id -> the sandboxes marked `error` because of its loss.
    lost: dict[str, set[str]] = field(default_factory=dict)
    started_at: datetime | None = None

    @property
    def interval(self) -> float:
        """Seconds between checks: the reconciliation's, and at least four per loss time."""
        settings = self.scheduler.settings
        return min(settings.reconcile_interval_seconds, settings.runner_lost_after_seconds / 4)

    async def run_forever(self, stop: asyncio.Event, leading: Callable[[], bool] = lambda: True) -> None:
        """Check every `interval` seconds while `leading()` (this replica holds the lease)."""
        while not stop.is_set():
            try:
                if leading():
                    await self.check_once()
                else:
                    self.lost.clear()
                    self.started_at = None
            except Exception as error:
                log.exception("runner_watch.failed", error=str(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)

    async def check_once(self, now: datetime | None = None) -> None:
        """Mark newly lost runners' sandboxes, and reconcile those of runners that came back."""
        moment = now or datetime.now(UTC)
        if self.started_at is None:
            self.started_at = moment
        if moment - self.started_at < self.scheduler.freshness:
            return
        runners = {info.runner_id: info for info in await kv_items(self.scheduler.runners_kv, RunnerInfo)}
        hosted: dict[str, list[Placement]] = {}
        for placement in await kv_items(self.scheduler.placements_kv, Placement):
            hosted.setdefault(placement.runner_id, []).append(placement)
        for runner_id in sorted(set(hosted) | set(self.lost)):
            info = runners.get(runner_id)
            if info is None:
                # A listing (nats-py's keys() watcher) can come back short on a loaded server: before calling
                # a runner lost for a missing entry, ask for that entry itself.
                info = await kv_get(self.scheduler.runners_kv, runner_id, RunnerInfo)
            alive = info is not None and moment - info.heartbeat_at <= self.scheduler.freshness
            if not alive and runner_id not in self.lost:
                self.lost[runner_id] = await self._mark_lost(runner_id, info, hosted.get(runner_id, []))
            elif alive and runner_id in self.lost:
                await self._welcome_back(runner_id, self.lost.pop(runner_id))

    async def _mark_lost(
        self, runner_id: str, info: RunnerInfo | None, placements: list[Placement]
    ) -> set[str]:
        seconds = self.scheduler.settings.runner_lost_after_seconds
        log.warning(
            "runner.lost",
            runner=runner_id,
            last_heartbeat=info.heartbeat_at.isoformat() if info else None,
            sandboxes=len(placements),
        )
        marked: set[str] = set()
        for placement in placements:
            desired = await kv_get(self.scheduler.desired_kv, placement.sandbox_id, DesiredSandbox)
            if desired is None or desired.desired_state == DesiredState.DESTROYED:
                continue
            if (
                placement.last_action == SandboxAction.ARCHIVE
                and desired.desired_state == DesiredState.ARCHIVED
            ):
                continue
            route = await kv_get(self.scheduler.routes_kv, placement.sandbox_id, SandboxRoute)
            if route is not None and route.state in UNAFFECTED_STATES:
                continue
            event = SandboxStateEvent(
                sandbox_id=placement.sandbox_id,
                organization_id=desired.organization_id,
                state=SandboxState.ERROR,
                error_reason=lost_reason(runner_id, seconds),
                recoverable=True,
                runner_id=runner_id,
                source="scheduler",
                cause=RUNNER_LOST,
            )
            await self.scheduler.bus.publish(channels.SANDBOX_EVENTS, event, sandbox_id=placement.sandbox_id)
            marked.add(placement.sandbox_id)
        return marked

    async def _welcome_back(self, runner_id: str, marked: set[str]) -> None:
        log.info("runner.back", runner=runner_id, sandboxes=len(marked))
        for sandbox_id in sorted(marked):
            desired = await kv_get(self.scheduler.desired_kv, sandbox_id, DesiredSandbox)
            placement = await kv_get(self.scheduler.placements_kv, sandbox_id, Placement)
            if desired is None or placement is None or placement.runner_id != runner_id:
                continue  # deleted, or moved on meanwhile
            await self.scheduler.redo_desired(desired)
