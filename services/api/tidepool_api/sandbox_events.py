"""A sandbox's event history: state changes, notable process endings and toolbox daemon restarts, as reported
by its runner."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api.context import ApiContext
from tidepool_api.db import SandboxEvent
from tidepool_api.schemas import iso
from tidepool_contracts.models import DaemonHealthEvent, ProcessTerminationEvent

STATE_UPDATED = "sandbox.state.updated"
PROCESS_TERMINATED = "sandbox.process.terminated"
# + the outcome: sandbox.daemon.restarted | sandbox.daemon.restart_failed | sandbox.daemon.recovered
DAEMON_HEALTH_PREFIX = "sandbox.daemon."


async def add_event(
    session: AsyncSession,
    *,
    sandbox_id: str,
    organization_id: str,
    event_type: str,
    dedupe_key: str,
    detail: dict[str, Any],
    occurred_at: datetime,
) -> None:
    """Add to the session unless already stored (bus messages may be redelivered)."""
    existing = await session.exec(
        select(SandboxEvent.id).where(
            SandboxEvent.sandbox_id == sandbox_id, SandboxEvent.dedupe_key == dedupe_key
        )
    )
    if existing.first() is not None:
        return
    session.add(
        SandboxEvent(
            id=str(uuid.uuid4()),
            sandbox_id=sandbox_id,
            organization_id=organization_id,
            type=event_type,
            dedupe_key=dedupe_key,
            detail=detail,
            occurred_at=occurred_at,
        )
    )


async def record_process_termination(context: ApiContext, event: ProcessTerminationEvent) -> None:
    async with context.database.sessions() as session:
        await add_event(
            session,
            sandbox_id=event.sandbox_id,
            organization_id=event.organization_id,
            event_type=PROCESS_TERMINATED,
            dedupe_key=f"process:{event.daemon_boot_id}:{event.sequence}",
            detail={
                "kind": event.kind,
                "command": event.command,
                "exitCode": event.exit_code,
                "reason": event.reason,
                "signal": event.signal,
            },
            occurred_at=event.ended_at,
        )
        await session.commit()


async def record_daemon_health(context: ApiContext, event: DaemonHealthEvent) -> None:
    async with context.database.sessions() as session:
        await add_event(
            session,
            sandbox_id=event.sandbox_id,
            organization_id=event.organization_id,
            event_type=f"{DAEMON_HEALTH_PREFIX}{event.outcome.value}",
            dedupe_key=f"daemon:{event.incident_id}",
            detail={"reason": event.reason},
            occurred_at=event.occurred_at,
        )
        await session.commit()


async def list_events(context: ApiContext, sandbox_id: str, limit: int) -> list[dict[str, Any]]:
    async with context.database.sessions() as session:
        rows = (
            await session.exec(
                select(SandboxEvent)
                .where(SandboxEvent.sandbox_id == sandbox_id)
                .order_by(col(SandboxEvent.occurred_at).desc())
                .limit(limit)
            )
        ).all()
    return [{"type": row.type, "occurredAt": iso(row.occurred_at), **row.detail} for row in rows]
