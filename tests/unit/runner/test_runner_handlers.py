"""A runner's job subscriber in FastStream's in-memory TestNatsBroker (no server): only its jobs arrive."""

from __future__ import annotations

from typing import Any

from faststream.nats import TestNatsBroker

from tidepool_contracts import channels
from tidepool_contracts.models import RunnerJob, SandboxAction, SandboxSpec
from tidepool_runner import subscribers
from tidepool_runtime.broker import Bus, create_broker, declare_publishers


class RecordingExecutor:
    def __init__(self) -> None:
        self.handled: list[RunnerJob] = []

    async def handle(self, job: RunnerJob, msg: Any) -> None:
        assert msg is not None  # the executor gets the NATS message (in-progress heartbeats, deliveries)
        self.handled.append(job)


def job(sandbox_id: str) -> RunnerJob:
    spec = SandboxSpec(sandbox_id=sandbox_id, organization_id="o", image="img:1")
    return RunnerJob(intent_id="i", sandbox_id=sandbox_id, action=SandboxAction.CREATE, spec=spec)


async def test_a_runner_handles_its_own_jobs_only() -> None:
    broker = create_broker("nats://unused:4222", "test")
    executor = RecordingExecutor()
    subscribers.register_jobs(broker, "runner-a", executor, 16)  # type: ignore[arg-type]
    scheduler = Bus(broker, declare_publishers(broker, channels.RUNNER_JOBS, service="scheduler"))
    async with TestNatsBroker(broker):
        await scheduler.publish(channels.RUNNER_JOBS, job("mine"), runner_id="runner-a")
        await scheduler.publish(channels.RUNNER_JOBS, job("theirs"), runner_id="runner-b")
    assert [handled.sandbox_id for handled in executor.handled] == ["mine"]
