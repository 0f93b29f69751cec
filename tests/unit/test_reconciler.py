"""The scheduler's reconciler against a real nats-server: a job no runner completes is re-sent, then given
up with an `error` state that says why (README: "gives up with a reason")."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from tidepool_contracts import subjects
from tidepool_contracts.bus import connect, kv_get, kv_put
from tidepool_contracts.config import Settings
from tidepool_contracts.models import DesiredSandbox, Placement, SandboxAction, SandboxSpec
from tidepool_contracts.states import DesiredState
from tidepool_scheduler.scheduler import Scheduler


async def test_an_unanswered_job_is_resent_then_given_up_with_a_reason(nats_url: str) -> None:
    settings = Settings(nats_url=nats_url, job_resend_after_seconds=0, job_max_attempts=2)
    bus = await connect(nats_url, "test-reconciler")
    try:
        scheduler = await Scheduler.create(settings, bus)
        sandbox_id, intent_id = str(uuid.uuid4()), str(uuid.uuid4())
        spec = SandboxSpec(sandbox_id=sandbox_id, organization_id="org-r", image="img:1")
        desired = DesiredSandbox(
            sandbox_id=sandbox_id,
            organization_id="org-r",
            desired_state=DesiredState.STARTED,
            spec=spec,
            intent_id=intent_id,
        )
        await kv_put(scheduler.desired_kv, sandbox_id, desired)
        sent = datetime.now(UTC) - timedelta(minutes=5)
        placement = Placement(
            sandbox_id=sandbox_id,
            runner_id="runner-silent",
            last_intent_id=intent_id,
            last_action=SandboxAction.CREATE,
            sent_at=sent,
            attempts=1,
        )
        await kv_put(scheduler.placements_kv, sandbox_id, placement)
        events: asyncio.Queue[dict] = asyncio.Queue()

        async def collect(msg) -> None:  # type: ignore[no-untyped-def]
            await events.put(orjson.loads(msg.data))

        subscription = await bus.nc.subscribe(subjects.event_sandbox(sandbox_id), cb=collect)
        try:
            await scheduler.reconcile_once()  # attempt 2: re-sent, no verdict yet
            resent = await kv_get(scheduler.placements_kv, sandbox_id, Placement)
            assert resent is not None and resent.attempts == 2
            assert events.empty()
            await scheduler.reconcile_once()  # no answer after the last attempt: give up
            event = await asyncio.wait_for(events.get(), 30)
        finally:
            await subscription.unsubscribe()
        assert event["state"] == "error"
        assert event["error_reason"] == "runner runner-silent did not complete 'create' after 2 attempts"
        given_up = await kv_get(scheduler.placements_kv, sandbox_id, Placement)
        assert given_up is not None and given_up.attempts == 3  # so the next round does not report again
    finally:
        await bus.close()
