"""Start-up of the scheduler: bus (subscribers.py), intent consumer, reconciliation loop; stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from tidepool_contracts.access import SCHEDULER
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.settings import SchedulerSettings
from tidepool_scheduler.lifecycle import LifecycleTimers
from tidepool_scheduler.scheduler import Scheduler
from tidepool_scheduler.subscribers import register

log = structlog.get_logger("tidepool.scheduler")


async def main(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    bus = Bus(create_broker(settings.nats_url, "tidepool-scheduler", **settings.nats_login), access=SCHEDULER)
    await bus.connect()
    scheduler = await Scheduler.create(settings, bus)
    bus.add_publishers(register(bus.broker, scheduler, settings.scheduler_intent_concurrency))
    await bus.start()
    timers = await LifecycleTimers.create(scheduler)
    loops = [
        asyncio.create_task(scheduler.reconcile_forever(stop)),
        asyncio.create_task(timers.run_forever(stop)),
    ]
    log.info("scheduler.ready")
    await stop.wait()
    for task in loops:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*loops, return_exceptions=True)
    await bus.close()
