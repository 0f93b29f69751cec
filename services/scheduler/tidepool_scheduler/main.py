"""Start-up of the scheduler: bus (subscribers.py), intent consumer, leader lease, and, while this replica
leads (leader.py), the reconciliation loop, lifecycle timers and the runner-loss watch (runner_loss.py);
probes (tidepool_runtime.health); stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import structlog

from tidepool_contracts import channels
from tidepool_contracts.access import SCHEDULER
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.health import Health, bus_check, serve_health
from tidepool_runtime.settings import SchedulerSettings
from tidepool_scheduler.leader import LeaderLease
from tidepool_scheduler.lifecycle import LifecycleTimers
from tidepool_scheduler.runner_loss import RunnerWatch
from tidepool_scheduler.scheduler import Scheduler
from tidepool_scheduler.subscribers import register

log = structlog.get_logger("tidepool.scheduler")


async def main(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    bus = Bus(
        create_broker(settings.nats_url, "tidepool-scheduler", **settings.nats_login),
        access=SCHEDULER,
        replicas=settings.nats_replicas,
        create_streams=settings.bus_create_streams,
    )
    health = Health("scheduler", {"nats": bus_check(lambda: bus)})
    probes = await serve_health(health, settings.health_host, settings.health_port)
    await bus.connect()
    scheduler = await Scheduler.create(settings, bus)
    holder = settings.scheduler_id or f"{socket.gethostname()}-{os.getpid()}"
    lease = LeaderLease(await bus.kv(channels.SCHEDULER_LEASE), holder, settings.scheduler_lease_seconds)
    # Every replica consumes intents (one durable consumer: each intent to one replica at a time).
    bus.add_publishers(register(bus.broker, scheduler, settings.scheduler_intent_concurrency))
    await bus.start()
    timers = await LifecycleTimers.create(scheduler)
    campaign = asyncio.create_task(lease.run_forever(stop), name="scheduler-lease")
    loops = [
        asyncio.create_task(scheduler.reconcile_forever(stop, lambda: lease.is_leader), name="reconcile"),
        asyncio.create_task(timers.run_forever(stop, lambda: lease.is_leader), name="lifecycle-timers"),
        asyncio.create_task(
            RunnerWatch(scheduler).run_forever(stop, lambda: lease.is_leader), name="runner-watch"
        ),
    ]
    health.watch(campaign, *loops)
    log.info("scheduler.ready", holder=holder)
    await stop.wait()
    for task in loops:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*loops, return_exceptions=True)
    await campaign  # steps down: the other replica takes over at its next check
    await bus.close()
    if probes is not None:
        await probes.cleanup()
