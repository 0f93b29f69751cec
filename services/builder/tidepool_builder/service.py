"""Build jobs from the bus: build (or find) the image, stream its log, report the snapshot's state."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiodocker
import structlog
from nats.aio.msg import Msg

from tidepool_builder.docker_build import BuildFailedError, build_image, image_exists
from tidepool_contracts import subjects
from tidepool_contracts.bus import Bus, consume, keep_in_progress, publish
from tidepool_contracts.config import Settings
from tidepool_contracts.models import BuildJob, SnapshotEvent, SnapshotState

log = structlog.get_logger("tidepool.builder")


def read_context(context_dir: str | None) -> dict[str, bytes]:
    """Files next to the Dockerfile become the build context (the Dockerfile itself is passed separately)."""
    if not context_dir:
        return {}
    root = Path(context_dir)
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "Dockerfile"
    }


class Builder:
    def __init__(self, settings: Settings, bus: Bus, docker: aiodocker.Docker) -> None:
        self.settings = settings
        self.bus = bus
        self.docker = docker

    async def report(self, job: BuildJob, state: SnapshotState, reason: str | None = None) -> None:
        event = SnapshotEvent(
            snapshot_name=job.snapshot_name, image_ref=job.image_ref, state=state, error_reason=reason
        )
        await publish(self.bus, subjects.event_snapshot(job.snapshot_name), event)

    async def handle(self, job: BuildJob, msg: Msg) -> None:
        if await image_exists(self.docker, job.image_ref):
            await self.report(job, SnapshotState.ACTIVE)
            return
        await self.report(job, SnapshotState.BUILDING)
        log.info("build.started", image=job.image_ref)

        async def on_log(line: str) -> None:
            log.debug("build.log", image=job.image_ref, line=line)
            event = SnapshotEvent(
                snapshot_name=job.snapshot_name,
                image_ref=job.image_ref,
                state=SnapshotState.BUILDING,
                log_line=line,
            )
            await publish(self.bus, subjects.event_snapshot(job.snapshot_name), event)

        heartbeat = asyncio.create_task(keep_in_progress(msg))
        try:
            await build_image(
                self.docker,
                dockerfile=job.dockerfile,
                context_files=read_context(job.context_dir),
                tag=job.image_ref,
                ca_bundle_path=self.settings.ca_bundle or None,
                on_log=on_log,
            )
        except BuildFailedError as error:
            log.error("build.failed", image=job.image_ref, error=str(error))
            await self.report(job, SnapshotState.BUILD_FAILED, str(error))
            return
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        log.info("build.finished", image=job.image_ref)
        await self.report(job, SnapshotState.ACTIVE)

    async def run(self) -> None:
        await consume(
            self.bus,
            stream=subjects.JOBS_STREAM,
            durable="builder",
            subject=subjects.JOB_BUILD_SUBJECT,
            model_type=BuildJob,
            handler=self.handle,
            ack_wait=30.0,
            max_deliver=5,
            concurrency=2,
        )
