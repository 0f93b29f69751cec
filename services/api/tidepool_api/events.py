"""Applies actual-state events from runners and the builder to the database, through the state machine."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import structlog
from sqlmodel import col, select

from tidepool_api import webhooks
from tidepool_api.context import ApiContext
from tidepool_api.db import Sandbox, Snapshot
from tidepool_api.sandbox_events import STATE_UPDATED, add_event
from tidepool_api.sandboxes import fail_build_waiters, mark_building, release_built_sandbox, transition
from tidepool_api.snapshots import pending_build_sandboxes
from tidepool_contracts.models import SandboxStateEvent, SnapshotEvent, SnapshotState
from tidepool_contracts.states import DesiredState, SandboxState, can_transition

log = structlog.get_logger("tidepool.api.events")


async def apply_sandbox_event(context: ApiContext, event: SandboxStateEvent) -> None:
    async with context.database.sessions() as session:
        sandbox = await session.get(Sandbox, event.sandbox_id)
        if sandbox is None:
            return
        current = SandboxState(sandbox.state)
        if not can_transition(current, event.state):
            # A stale report (e.g. `started` for a sandbox the user already deleted): the state machine wins.
            log.info("sandbox.event_ignored", sandbox_id=sandbox.id, current=current, reported=event.state)
            return
        changes: dict[str, object] = {"error_reason": event.error_reason, "recoverable": event.recoverable}
        if event.runner_id:
            changes["runner_id"] = event.runner_id
        if event.daemon_version:
            changes["daemon_version"] = event.daemon_version
        if event.cause == "auto_stop":
            changes["desired_state"] = DesiredState.STOPPED.value  # the platform stopped it, not a user
        elif event.cause == "auto_delete":
            changes["desired_state"] = DesiredState.DESTROYED.value
        elif event.cause == "auto_archive":
            changes["desired_state"] = DesiredState.ARCHIVED.value
        if event.state == SandboxState.ARCHIVED and event.image:
            # Its filesystem now lives in this image (the registry's copy): the next start restores from it.
            changes["image"] = event.image
            changes["runner_id"] = None
        if event.state == SandboxState.DESTROYED:
            # Frees the name for reuse while keeping the row for audit.
            changes["name"] = f"DESTROYED_{sandbox.name}_{int(time.time() * 1000)}"
        if not await transition(session, sandbox, event.state, cause=event.cause, **changes):
            raise RuntimeError(f"sandbox {sandbox.id} changed concurrently; retrying the event")
        if current != event.state:
            await add_event(
                session,
                sandbox_id=sandbox.id,
                organization_id=sandbox.organization_id,
                event_type=STATE_UPDATED,
                dedupe_key=f"state:{event.state}:{event.occurred_at.isoformat()}",
                detail={
                    "oldState": current.value,
                    "newState": event.state.value,
                    "errorReason": event.error_reason,
                    "recoverable": event.recoverable,
                    "cause": event.cause,
                },
                occurred_at=event.occurred_at,
            )
        await session.commit()
    log.info("sandbox.state", sandbox_id=event.sandbox_id, state=event.state, reason=event.error_reason)
    context.waiters.notify(event.sandbox_id)


async def apply_snapshot_event(context: ApiContext, event: SnapshotEvent) -> None:
    """Apply a build event to the snapshot it is about, never to others that happen to share an image.

    An event names its snapshot by id; one without an id comes from the platform's own image job and
    applies to the general (platform) snapshots of that image only.
    """
    async with context.database.sessions() as session:
        if event.snapshot_id is not None:
            row = await session.get(Snapshot, event.snapshot_id)
            rows = [row] if row is not None and (row.ref or row.image_name) == event.image_ref else []
        else:
            platform = select(Snapshot).where(
                Snapshot.ref == event.image_ref, col(Snapshot.general).is_(True)
            )
            rows = list((await session.exec(platform)).all())
        for snapshot in rows:
            old_state = snapshot.state
            snapshot.state = event.state.value
            snapshot.error_reason = event.error_reason
            if event.entrypoint is not None and not snapshot.entrypoint:
                snapshot.entrypoint = event.entrypoint
            if event.size_bytes is not None:
                snapshot.size_bytes = event.size_bytes
            if event.registry_ref:
                snapshot.registry_ref = event.registry_ref
            snapshot.updated_at = datetime.now(UTC)
            webhooks.record_snapshot_state(session, snapshot, old_state, snapshot.state)
            session.add(snapshot)
        await session.commit()
        waiting = [sandbox.id for row in rows for sandbox in await pending_build_sandboxes(session, row)]
    log.info(
        "snapshot.state",
        snapshot_id=event.snapshot_id,
        image=event.image_ref,
        state=event.state,
        reason=event.error_reason,
        applied=len(rows),
    )
    if event.state == SnapshotState.BUILDING:
        await mark_building(context, waiting)
    elif event.state == SnapshotState.ACTIVE:
        for sandbox_id in waiting:
            await release_built_sandbox(context, sandbox_id)
    elif event.state in (SnapshotState.BUILD_FAILED, SnapshotState.ERROR):
        await fail_build_waiters(context, waiting, event.error_reason)
