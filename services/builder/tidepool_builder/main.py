"""Start-up of the builder: the bus (subscribers.py) and the container engine; stop on SIGTERM."""

from __future__ import annotations

import asyncio

import aiodocker
import structlog

from tidepool_builder.build_cgroup import sweep_stale
from tidepool_builder.builds import Builder
from tidepool_builder.subscribers import register
from tidepool_contracts.access import BUILDER
from tidepool_runtime.broker import Bus, create_broker
from tidepool_runtime.health import Health, bus_check, engine_check, serve_health
from tidepool_runtime.settings import BuilderSettings

log = structlog.get_logger("tidepool.builder")


async def main(settings: BuilderSettings, stop: asyncio.Event) -> None:
    bus = Bus(
        create_broker(settings.nats_url, "tidepool-builder", **settings.nats_login),
        access=BUILDER,
        replicas=settings.nats_replicas,
        create_streams=settings.bus_create_streams,
    )
    docker = aiodocker.Docker(url=settings.effective_docker_host)
    health = Health("builder", {"nats": bus_check(lambda: bus), "engine": engine_check(lambda: docker)})
    probes = await serve_health(health, settings.health_host, settings.health_port)
    await bus.connect()
    await asyncio.to_thread(sweep_stale)  # cgroups of builds a crashed builder left behind
    builder = Builder(settings, bus, docker)
    bus.add_publishers(register(bus.broker, builder))
    await bus.start()
    log.info("builder.ready", engine=settings.effective_docker_host)
    await stop.wait()
    await bus.close()
    await docker.close()
    if probes is not None:
        await probes.cleanup()
