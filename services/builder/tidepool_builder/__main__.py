"""Entry point: `python -m tidepool_builder`."""

from __future__ import annotations

import asyncio
import contextlib

import aiodocker
import structlog

from tidepool_builder.service import Builder
from tidepool_runtime.bus import connect
from tidepool_runtime.process import run_service
from tidepool_runtime.settings import Settings

log = structlog.get_logger("tidepool.builder")


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await connect(settings.nats_url, "tidepool-builder")
    docker = aiodocker.Docker(url=settings.effective_docker_host)
    builder = Builder(settings, bus, docker)
    task = asyncio.create_task(builder.run())
    log.info("builder.ready", engine=settings.effective_docker_host)
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await docker.close()
    await bus.close()


if __name__ == "__main__":
    run_service("builder", main)
