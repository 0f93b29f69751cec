"""Start-up of the scheduler: bus (subscribers.py), intent consumer, reconciliation loop; stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from tidepool_contracts.access import SCHEDULER
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.settings import SchedulerSettings
from tidepool_scheduler.scheduler import Scheduler
from tidepool_scheduler.subscribers import register

log = structlog.get_logger("tidepool.scheduler")


async def main(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    bus = Bus(create_broker(settings.nats_url, "tidepool-scheduler", **settings.nats_login), access=SCHEDULER)
    await bus.connect()
    scheduler = await Scheduler.create(settings, bus)
    bus.add_publishers(register(bus.broker, scheduler))
    await bus.start()
    reconciling = asyncio.create_task(scheduler.reconcile_forever(stop))
    log.info("scheduler.ready")
    await stop.wait()
    reconciling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reconciling
    await bus.close()
