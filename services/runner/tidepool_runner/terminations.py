"""Collect notable process endings (signal, timeout, OOM kill) from each running sandbox's daemon and publish
them, so the API can show them among the sandbox's events. Polling keeps the daemon free of any bus access."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import orjson
import structlog

from tidepool_contracts import channels
from tidepool_contracts.models import ProcessTerminationEvent
from tidepool_runner.backend import TOOLBOX_BASE_URL, SandboxBackend
from tidepool_runtime.broker import Bus

log = structlog.get_logger("tidepool.runner.terminations")
POLL_INTERVAL_SECONDS = 5.0
# Plain exits are the normal case and stay in the daemon; these are worth an event.
NOTABLE_REASONS = frozenset({"signal", "timeout", "oom_killed"})


@dataclass
class TerminationCollector:
    backend: SandboxBackend
    bus: Bus
    # sandbox id -> (daemon boot id, last sequence seen)
    _cursors: dict[str, tuple[str, int]] = field(default_factory=dict)

    async def collect_once(self) -> int:
        published = 0
        running = [sandbox for sandbox in await self.backend.list_sandboxes() if sandbox.running]
        for sandbox in running:
            if sandbox.sandbox_id:
                published += await self._collect(sandbox.sandbox_id, sandbox.organization_id)
        live = {sandbox.sandbox_id for sandbox in running}
        for gone in set(self._cursors) - live:
            del self._cursors[gone]
        return published

    async def _collect(self, sandbox_id: str, organization_id: str) -> int:
        boot_id, after = self._cursors.get(sandbox_id, ("", 0))
        try:
            async with self.backend.toolbox.session(sandbox_id).get(
                f"{TOOLBOX_BASE_URL}/process/terminations",
                params={"after": str(after)},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                if response.status != 200:
                    return 0  # an older daemon without the endpoint, or one shutting down
                body = orjson.loads(await response.read())
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
            return 0
        if body.get("bootId") != boot_id and after:
            # The daemon restarted (sandbox stop/start): its numbering starts over.
            self._cursors[sandbox_id] = (body.get("bootId", ""), 0)
            return await self._collect(sandbox_id, organization_id)
        published = 0
        for record in body.get("records", []):
            after = max(after, int(record["sequence"]))
            if record.get("reason") not in NOTABLE_REASONS:
                continue
            event = ProcessTerminationEvent(
                sandbox_id=sandbox_id,
                organization_id=organization_id,
                daemon_boot_id=body["bootId"],
                sequence=int(record["sequence"]),
                kind=str(record.get("kind", "")),
                command=str(record.get("command", "")),
                exit_code=record.get("exitCode"),
                reason=str(record["reason"]),
                signal=record.get("signal"),
                ended_at=datetime.fromtimestamp(float(record["endedAt"]), UTC),
            )
            await self.bus.publish(
                channels.PROCESS_EVENTS,
                event,
                msg_id=f"{sandbox_id}:{event.daemon_boot_id}:{event.sequence}",
                sandbox_id=sandbox_id,
            )
            published += 1
        self._cursors[sandbox_id] = (body.get("bootId", ""), after)
        return published

    async def run_forever(self) -> None:
        while True:
            try:
                await self.collect_once()
            except Exception as error:  # the engine or the bus is away for a moment: next round
                log.warning("terminations.collect_failed", error=str(error))
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
