"""Executes RunnerJobs through the runner's sandbox backend (backend.SandboxBackend) and reports the
resulting state: routes in KV, sandbox state events and snapshot events.

The handlers call the backend only: what a sandbox is (a container, a Pod) is the backend's business. Every
action converges: a job redelivered after a crash (or sent twice by the scheduler) finds the sandbox where
the first attempt left it and finishes the work, so handling a job twice is harmless.
"""

from __future__ import annotations

import asyncio

import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import (
    RunnerJob,
    SandboxAction,
    SandboxRoute,
    SandboxStateEvent,
    SnapshotEvent,
    SnapshotState,
)
from tidepool_contracts.states import SandboxState
from tidepool_contracts.subjects import kv_safe
from tidepool_runner.backend import BackendUnavailableError, SandboxBackend, SandboxFailedError
from tidepool_runtime.broker import Bus, KeyValue, Msg, keep_in_progress, kv_delete, kv_get, kv_put
from tidepool_runtime.locks import SandboxLocks
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.jobs")

# Transient backend failures are retried via redelivery; after this many deliveries the job reports `error`.
MAX_TRANSIENT_ATTEMPTS = 5
IN_PROGRESS_INTERVAL_SECONDS = 5.0
EVENT_SOURCE = "runner"


class JobExecutor:
    def __init__(
        self,
        *,
        settings: RunnerSettings,
        runner_id: str,
        bus: Bus,
        routes: KeyValue,
        backend: SandboxBackend,
    ) -> None:
        self._settings = settings
        self._runner_id = runner_id
        self._bus = bus
        self._routes = routes
        self._backend = backend
        self._locks = SandboxLocks()

    @property
    def backend(self) -> SandboxBackend:
        return self._backend

    @property
    def locks(self) -> SandboxLocks:
        """The per-sandbox locks its jobs run under (the daemon health checker takes them too)."""
        return self._locks

    async def handle(self, job: RunnerJob, msg: Msg) -> None:
        """The bus handler. Must take the sandbox's lock before its first await to keep arrival order."""
        # Started first so a job queued behind a slow one of the same sandbox is not redelivered meanwhile.
        alive = asyncio.create_task(keep_in_progress(msg, IN_PROGRESS_INTERVAL_SECONDS))
        try:
            async with self._locks.hold(job.sandbox_id):
                attempt = msg.metadata.num_delivered if msg.metadata else 1
                await self.execute(job, attempt=attempt)
        finally:
            alive.cancel()

    async def execute(self, job: RunnerJob, *, attempt: int = 1) -> None:
        bound = log.bind(
            sandbox_id=job.sandbox_id, action=str(job.action), job_id=job.job_id, attempt=attempt
        )
        bound.info("job.started")
        backend = self._backend
        try:
            match job.action:
                case SandboxAction.CREATE | SandboxAction.START:
                    # Same convergence either way: a START whose sandbox vanished recreates it.
                    daemon_version = await backend.start(job.spec)
                    await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)
                case SandboxAction.CLAIM:
                    # The route is rewritten (to the claimer's organization) by the report.
                    daemon_version = await backend.claim(job.spec)
                    await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)
                case SandboxAction.RESIZE:
                    if await backend.resize(job.spec):
                        await self._report(job, SandboxState.STARTED)
                    else:
                        # Nothing runs: converge like a START would, which applies the new resources.
                        daemon_version = await backend.start(job.spec)
                        await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)
                case SandboxAction.RECOVER:
                    daemon_version = await backend.recover(job.spec)
                    await self._report(job, SandboxState.STARTED, daemon_version=daemon_version)
                case SandboxAction.STOP:
                    await backend.stop(job.spec, force=job.force)
                    await self._report(job, SandboxState.STOPPED)
                case SandboxAction.DESTROY:
                    await self._destroy(job)
                case SandboxAction.ARCHIVE:
                    image = await backend.archive(job.spec, archive_id=job.intent_id)
                    await self._report(job, SandboxState.ARCHIVED, image=image)
                case SandboxAction.SNAPSHOT:
                    await self._snapshot(job)
                case SandboxAction.NETWORK:
                    # No state change; a failure to apply is reported as the sandbox's error.
                    await backend.update_network(job.spec)
        except SandboxFailedError as failure:
            bound.warning("job.failed", reason=failure.reason)
            await self._report(job, SandboxState.ERROR, error_reason=failure.reason)
        except BackendUnavailableError as error:
            if attempt < MAX_TRANSIENT_ATTEMPTS:
                bound.warning("job.engine_unavailable", error=str(error))
                raise  # nak: redelivered with backoff
            await self._report(job, SandboxState.ERROR, error_reason=f"container engine unavailable: {error}")
        else:
            bound.info("job.done")

    async def _snapshot(self, job: RunnerJob) -> None:
        """Commit the sandbox's filesystem to the snapshot `job.snapshot` names and report that snapshot (not
        the sandbox) active, or failed with the reason."""
        target = job.snapshot
        if target is None:
            return
        event: SnapshotEvent
        try:
            committed = await self._backend.snapshot(job.spec, target.image_ref)
            event = SnapshotEvent(
                snapshot_id=target.snapshot_id,
                snapshot_name=target.snapshot_name,
                image_ref=target.image_ref,
                state=SnapshotState.ACTIVE,
                entrypoint=job.spec.entrypoint,
                size_bytes=committed.size_bytes,
                registry_ref=committed.reference if committed.reference != target.image_ref else None,
            )
        except SandboxFailedError as failure:
            event = SnapshotEvent(
                snapshot_id=target.snapshot_id,
                snapshot_name=target.snapshot_name,
                image_ref=target.image_ref,
                state=SnapshotState.ERROR,
                error_reason=f"cannot snapshot sandbox {job.sandbox_id}: {failure.reason}",
            )
        await self._bus.publish(
            channels.SNAPSHOT_EVENTS,
            event,
            msg_id=f"{job.job_id}:{event.state}",
            snapshot=kv_safe(target.snapshot_name),
        )

    async def _destroy(self, job: RunnerJob) -> None:
        await self._backend.delete(job.sandbox_id)
        # Only our own route: if the sandbox has since been placed on another runner, that route is not ours.
        route = await kv_get(self._routes, job.sandbox_id, SandboxRoute)
        if route is None or route.runner_id == self._runner_id:
            await kv_delete(self._routes, job.sandbox_id)
        await self._publish_event(job, SandboxState.DESTROYED)

    async def _report(
        self,
        job: RunnerJob,
        state: SandboxState,
        *,
        error_reason: str | None = None,
        daemon_version: str | None = None,
        image: str | None = None,
    ) -> None:
        # Route first: whoever reacts to `started` (the SDK via the API) must find the proxy route in place.
        route = SandboxRoute(
            sandbox_id=job.sandbox_id,
            organization_id=job.spec.organization_id,
            runner_id=self._runner_id,
            runner_url=self._settings.effective_runner_url,
            state=state,
        )
        await kv_put(self._routes, job.sandbox_id, route)
        await self._publish_event(
            job, state, error_reason=error_reason, daemon_version=daemon_version, image=image
        )

    async def _publish_event(
        self,
        job: RunnerJob,
        state: SandboxState,
        *,
        error_reason: str | None = None,
        daemon_version: str | None = None,
        image: str | None = None,
    ) -> None:
        event = SandboxStateEvent(
            sandbox_id=job.sandbox_id,
            organization_id=job.spec.organization_id,
            state=state,
            error_reason=error_reason,
            runner_id=self._runner_id,
            daemon_version=daemon_version,
            source=EVENT_SOURCE,
            image=image,
        )
        # A redelivered job that reaches the same outcome publishes nothing new (JetStream de-duplication).
        await self._bus.publish(
            channels.SANDBOX_EVENTS, event, msg_id=f"{job.job_id}:{state}", sandbox_id=job.sandbox_id
        )
