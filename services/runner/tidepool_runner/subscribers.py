"""Every subscriber and publisher of a runner on the bus (the map: docs/asyncapi/asyncapi.yaml).

Subscribes: its own jobs (`tidepool.job.runner.<runner id>`). Publishes: sandbox state, process-termination
and daemon-health events, and snapshot events (filesystems committed from sandboxes). Writes the routes and
runners buckets (inventory.py, jobs.py).
"""

from __future__ import annotations

from typing import Any

from faststream.nats.annotations import NatsMessage

from tidepool_contracts import channels
from tidepool_contracts.models import RunnerJob
from tidepool_runner.jobs import JobExecutor
from tidepool_runtime.broker import Registrar, declare_publishers, jetstream_subscriber

PUBLISHES = (
    channels.SANDBOX_EVENTS,
    channels.PROCESS_EVENTS,
    channels.DAEMON_EVENTS,
    channels.SNAPSHOT_EVENTS,
    channels.SANDBOX_METRICS,
    channels.SANDBOX_FLOWS,
)
JOB_ACK_WAIT_SECONDS = 15.0


def publishers(registrar: Registrar) -> dict[channels.Channel[Any], Any]:
    return declare_publishers(registrar, *PUBLISHES, service="runner")


def register_jobs(registrar: Registrar, runner_id: str, executor: JobExecutor, concurrency: int) -> None:
    """Consume this runner's jobs (a durable consumer per runner: jobs wait while the runner is down),
    at most `concurrency` at once (setting `runner_job_concurrency`)."""

    @jetstream_subscriber(
        registrar,
        channels.RUNNER_JOBS,
        durable=f"runner-{runner_id}",
        subject=channels.RUNNER_JOBS.address(runner_id=runner_id),
        ack_wait=JOB_ACK_WAIT_SECONDS,
        concurrency=concurrency,
    )
    async def on_job(job: RunnerJob, msg: NatsMessage) -> None:
        await executor.handle(job, msg.raw_message)
