"""Intent handling and the reconciliation loop.

Intents arrive durably from the API. Placing a sandbox and sending its job are idempotent (placement is kept
in KV, jobs carry a dedupe id), so a scheduler killed mid-intent redoes the same work after redelivery. The
reconciler re-sends jobs that got no answer and gives up with an `error` state after a few attempts, so no
sandbox stays in a transient state forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import (
    DesiredSandbox,
    Placement,
    RunnerControl,
    RunnerInfo,
    RunnerJob,
    SandboxAction,
    SandboxIntent,
    SandboxRoute,
    SandboxStateEvent,
)
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import Bus, KeyValue, Msg, kv_delete, kv_get, kv_items, kv_put
from tidepool_runtime.locks import SandboxLocks
from tidepool_runtime.settings import SchedulerSettings
from tidepool_scheduler.placement import choose_runner, no_runner_reason

log = structlog.get_logger("tidepool.scheduler")

# After this many deliveries without any runner, the create fails visibly instead of waiting forever.
MAX_DELIVERIES_WITHOUT_RUNNER = 12

ACTION_FOR_DESIRED = {
    DesiredState.STARTED: SandboxAction.START,
    DesiredState.STOPPED: SandboxAction.STOP,
    DesiredState.DESTROYED: SandboxAction.DESTROY,
}
CONVERGED_ROUTE_STATE = {
    DesiredState.STARTED: SandboxState.STARTED,
    DesiredState.STOPPED: SandboxState.STOPPED,
    DesiredState.ARCHIVED: SandboxState.ARCHIVED,
}


@dataclass
class Scheduler:
    settings: SchedulerSettings
    bus: Bus
    runners_kv: KeyValue
    placements_kv: KeyValue
    desired_kv: KeyValue
    routes_kv: KeyValue
    controls_kv: KeyValue
    _intent_locks: SandboxLocks = field(default_factory=SandboxLocks, repr=False)

    @classmethod
    async def create(cls, settings: SchedulerSettings, bus: Bus) -> Scheduler:
        return cls(
            settings=settings,
            bus=bus,
            runners_kv=await bus.kv(channels.RUNNERS),
            placements_kv=await bus.kv(channels.PLACEMENTS),
            desired_kv=await bus.kv(channels.DESIRED),
            routes_kv=await bus.kv(channels.ROUTES),
            controls_kv=await bus.kv(channels.RUNNER_CONTROLS),
        )

    @property
    def freshness(self) -> timedelta:
        """How old a runner's last heartbeat may be before it counts as lost (`runner_lost_after_seconds`)."""
        return timedelta(seconds=self.settings.runner_lost_after_seconds)

    async def cordoned(self) -> frozenset[str]:
        """Ids of the runners the admin cordoned or is draining: they get no new placements."""
        controls = await kv_items(self.controls_kv, RunnerControl)
        return frozenset(control.runner_id for control in controls if control.cordoned or control.draining)

    async def report(self, intent: SandboxIntent, state: SandboxState, reason: str | None = None) -> None:
        event = SandboxStateEvent(
            sandbox_id=intent.sandbox_id,
            organization_id=intent.organization_id,
            state=state,
            error_reason=reason,
            source="scheduler",
        )
        await self.bus.publish(channels.SANDBOX_EVENTS, event, sandbox_id=intent.sandbox_id)

    async def send_job(self, intent: SandboxIntent, placement: Placement, attempt: int) -> None:
        job = RunnerJob(
            intent_id=intent.intent_id,
            sandbox_id=intent.sandbox_id,
            action=intent.action,
            spec=intent.spec,
            force=intent.force,
            snapshot=intent.snapshot,
        )
        await self.bus.publish(
            channels.RUNNER_JOBS, job, msg_id=f"{intent.intent_id}:{attempt}", runner_id=placement.runner_id
        )
        log.info("job.sent", sandbox_id=intent.sandbox_id, action=intent.action, runner=placement.runner_id)

    async def lifecycle_change(
        self,
        desired: DesiredSandbox,
        action: SandboxAction,
        desired_state: DesiredState,
        transitional: SandboxState,
        cause: str,
    ) -> None:
        """The platform's own decision (a lifecycle timer), carried out as a user's intent would be: the new
        desired state first (so the reconciler converges on it after a crash), then an event saying why,
        then the job."""
        intent = await self._record_intent(
            desired, action, desired_state=desired_state, updated_at=datetime.now(UTC)
        )
        event = SandboxStateEvent(
            sandbox_id=desired.sandbox_id,
            organization_id=desired.organization_id,
            state=transitional,
            source="scheduler",
            cause=cause,
        )
        await self.bus.publish(channels.SANDBOX_EVENTS, event, sandbox_id=desired.sandbox_id)
        await self.handle_intent(intent, None)

    async def redo_desired(self, desired: DesiredSandbox) -> None:
        """Send the sandbox's runner the job for its desired state again, as a new intent (a new dedupe
        id): the runner converges and reports the actual state (e.g. after it was lost and came back)."""
        action = ACTION_FOR_DESIRED.get(desired.desired_state)
        if action is None:
            return  # archived: nothing of it is on a runner
        await self.handle_intent(await self._record_intent(desired, action), None)

    async def _record_intent(
        self, desired: DesiredSandbox, action: SandboxAction, **changes: Any
    ) -> SandboxIntent:
        """A new intent of the platform's own for the sandbox (a new dedupe id), written into its desired
        state first with `changes`, so the reconciler converges on it after a crash."""
        intent = SandboxIntent(
            sandbox_id=desired.sandbox_id,
            organization_id=desired.organization_id,
            action=action,
            spec=desired.spec,
        )
        update = {**changes, "intent_id": intent.intent_id, "force": False}
        await kv_put(self.desired_kv, desired.sandbox_id, desired.model_copy(update=update))
        return intent

    async def handle_intent(self, intent: SandboxIntent, msg: Msg | None) -> None:
        """Carry out one intent; a sandbox's intents one at a time (a DESTROY that found no placement while
        a concurrent CREATE was placing it would leave a container nobody owns)."""
        async with self._intent_locks.hold(intent.sandbox_id):
            await self._handle_intent(intent, msg)

    async def _handle_intent(self, intent: SandboxIntent, msg: Msg | None) -> None:
        desired = await kv_get(self.desired_kv, intent.sandbox_id, DesiredSandbox)
        if intent.action == SandboxAction.CREATE and (
            desired is None or desired.desired_state == DesiredState.DESTROYED
        ):
            # Deleted before it was ever placed: creating it now would leave an orphan container.
            log.info("intent.superseded", sandbox_id=intent.sandbox_id)
            return
        placement = await kv_get(self.placements_kv, intent.sandbox_id, Placement)
        if intent.action in (SandboxAction.SNAPSHOT, SandboxAction.NETWORK):
            # A one-off job to the sandbox's runner: no desired state, so the placement is left alone.
            if placement is None:
                log.warning("intent.one_off_unplaced", sandbox_id=intent.sandbox_id, action=intent.action)
                return
            await self.send_job(intent, placement, attempt=1)
            return
        if (
            placement is not None
            and placement.last_action == SandboxAction.ARCHIVE
            and intent.action in (SandboxAction.START, SandboxAction.CREATE)
        ):
            # Restoring an archive: its old runner keeps nothing of it, so any runner may take it.
            await kv_delete(self.placements_kv, intent.sandbox_id)
            placement = None
        if placement is None:
            if intent.action == SandboxAction.DESTROY:
                # Never placed: nothing runs anywhere.
                await self.report(intent, SandboxState.DESTROYED)
                return
            if intent.action == SandboxAction.STOP:
                await self.report(intent, SandboxState.STOPPED)
                return
            runners = await kv_items(self.runners_kv, RunnerInfo)
            cordoned = await self.cordoned()
            runner = choose_runner(
                runners, intent.spec, action=intent.action, freshness=self.freshness, cordoned=cordoned
            )
            if runner is None:
                delivered = msg.metadata.num_delivered if msg is not None and msg.metadata else 1
                if delivered >= MAX_DELIVERIES_WITHOUT_RUNNER:
                    reason = no_runner_reason(
                        runners,
                        intent.spec,
                        action=intent.action,
                        freshness=self.freshness,
                        cordoned=cordoned,
                    )
                    await self.report(intent, SandboxState.ERROR, reason)
                    return
                raise RuntimeError("no runner available yet")
            placement = Placement(
                sandbox_id=intent.sandbox_id,
                runner_id=runner.runner_id,
                last_intent_id=intent.intent_id,
                last_action=intent.action,
            )
        elif placement.last_intent_id != intent.intent_id:
            placement = placement.model_copy(
                update={
                    "last_intent_id": intent.intent_id,
                    "last_action": intent.action,
                    "sent_at": datetime.now(UTC),
                    "attempts": 1,
                }
            )
        await kv_put(self.placements_kv, intent.sandbox_id, placement)
        await self.send_job(intent, placement, attempt=placement.attempts)

    async def reconcile_once(self) -> None:
        now = datetime.now(UTC)
        for desired in await kv_items(self.desired_kv, DesiredSandbox):
            route = await kv_get(self.routes_kv, desired.sandbox_id, SandboxRoute)
            placement = await kv_get(self.placements_kv, desired.sandbox_id, Placement)
            if desired.desired_state == DesiredState.DESTROYED and route is None:
                # Converged: forget the sandbox.
                await kv_delete(self.placements_kv, desired.sandbox_id)
                await kv_delete(self.desired_kv, desired.sandbox_id)
                continue
            if route is not None and route.state == CONVERGED_ROUTE_STATE.get(desired.desired_state):
                continue
            if route is not None and route.state == SandboxState.ERROR:
                continue  # a runner reported a permanent failure; the user decides what next
            if placement is None or placement.last_intent_id != desired.intent_id:
                continue  # the intent is still on its way through the intents stream
            waited = (now - placement.sent_at).total_seconds()
            if waited < self.settings.job_resend_after_seconds:
                continue
            intent = SandboxIntent(
                intent_id=desired.intent_id,
                sandbox_id=desired.sandbox_id,
                organization_id=desired.organization_id,
                action=placement.last_action,
                spec=desired.spec,
                force=desired.force,
            )
            if placement.attempts >= self.settings.job_max_attempts:
                log.warning("reconcile.gave_up", sandbox_id=desired.sandbox_id, runner=placement.runner_id)
                await self.report(
                    intent,
                    SandboxState.ERROR,
                    f"runner {placement.runner_id} did not complete '{placement.last_action}' "
                    f"after {placement.attempts} attempts",
                )
                await kv_put(
                    self.placements_kv,
                    desired.sandbox_id,
                    placement.model_copy(update={"sent_at": now, "attempts": placement.attempts + 1}),
                )
                continue
            placement = placement.model_copy(update={"sent_at": now, "attempts": placement.attempts + 1})
            await kv_put(self.placements_kv, desired.sandbox_id, placement)
            log.info("reconcile.resend", sandbox_id=desired.sandbox_id, attempt=placement.attempts)
            await self.send_job(intent, placement, attempt=placement.attempts)

    async def reconcile_forever(
        self, stop: asyncio.Event, leading: Callable[[], bool] = lambda: True
    ) -> None:
        """Reconcile every `reconcile_interval_seconds` while `leading()` (the replica holds the lease)."""
        while not stop.is_set():
            try:
                if leading():
                    await self.reconcile_once()
            except Exception as error:
                log.exception("reconcile.failed", error=str(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.reconcile_interval_seconds)
