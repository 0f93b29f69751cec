"""The scheduler's reconciler (in-memory broker and KV): a job no runner completes is re-sent, then given
up with an `error` state that says why (README: "gives up with a reason")."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from faststream.nats import TestNatsBroker

from tests.unit.scheduler.test_scheduler_handlers import scheduler_on_test_broker
from tidepool_contracts.models import (
    DesiredSandbox,
    Placement,
    RunnerJob,
    SandboxAction,
    SandboxSpec,
    SandboxStateEvent,
)
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_runtime.broker import kv_get, kv_put


async def test_an_unanswered_job_is_resent_then_given_up_with_a_reason() -> None:
    broker, scheduler, _api, sent = await scheduler_on_test_broker()
    scheduler.settings = scheduler.settings.model_copy(
        update={"job_resend_after_seconds": 0, "job_max_attempts": 2}
    )
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
    placement = Placement(
        sandbox_id=sandbox_id,
        runner_id="runner-silent",
        last_intent_id=intent_id,
        last_action=SandboxAction.CREATE,
        sent_at=datetime.now(UTC) - timedelta(minutes=5),
        attempts=1,
    )
    await kv_put(scheduler.placements_kv, sandbox_id, placement)
    async with TestNatsBroker(broker):
        await scheduler.reconcile_once()  # attempt 2: re-sent, no verdict yet
        resent = await kv_get(scheduler.placements_kv, sandbox_id, Placement)
        assert resent is not None and resent.attempts == 2
        assert [type(message) for message in sent] == [RunnerJob]
        assert (sent[0].sandbox_id, sent[0].action) == (sandbox_id, SandboxAction.CREATE)
        await scheduler.reconcile_once()  # no answer after the last attempt: give up
    events = [message for message in sent if isinstance(message, SandboxStateEvent)]
    assert len(events) == 1
    assert events[0].state is SandboxState.ERROR
    assert events[0].error_reason == "runner runner-silent did not complete 'create' after 2 attempts"
    given_up = await kv_get(scheduler.placements_kv, sandbox_id, Placement)
    assert given_up is not None and given_up.attempts == 3  # so the next round does not report again
