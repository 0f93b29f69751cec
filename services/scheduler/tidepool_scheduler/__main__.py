"""Entry point: `python -m tidepool_scheduler`."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from tidepool_runtime.bus import connect
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import Settings
from tidepool_scheduler.scheduler import Scheduler

log = structlog.get_logger("tidepool.scheduler")


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await connect(settings.nats_url, "tidepool-scheduler")
    scheduler = await Scheduler.create(settings, bus)
    tasks = [
        asyncio.create_task(scheduler.consume_intents()),
        asyncio.create_task(scheduler.reconcile_forever(stop)),
    ]
    log.info("scheduler.ready")
    await stop.wait()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)
    await bus.close()


if __name__ == "__main__":
    run_service("scheduler", main)
