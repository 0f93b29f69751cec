"""Toolbox use as a sandbox's activity, for the scheduler's auto-stop timer (behaviour spec "sandboxes").

Every toolbox request the runner relays counts; it is written to the activity KV bucket at most once per
`activity_write_interval_seconds` per sandbox, in the background, so the request never waits for it.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from tidepool_contracts.models import SandboxActivity
from tidepool_runtime.broker import KeyValue, kv_put

log = structlog.get_logger("tidepool.runner.activity")
PRUNE_AFTER_ENTRIES = 10_000


class ActivityRecorder:
    def __init__(self, kv: KeyValue, interval_seconds: float) -> None:
        self._kv = kv
        self._interval = interval_seconds
        self._written: dict[str, float] = {}  # sandbox id -> monotonic time of the last write
        self._tasks: set[asyncio.Task[None]] = set()

    def touch(self, sandbox_id: str) -> None:
        """Record use of the sandbox's toolbox now (throttled; never blocks)."""
        now = time.monotonic()
        if now - self._written.get(sandbox_id, float("-inf")) < self._interval:
            return
        self._written[sandbox_id] = now
        if len(self._written) > PRUNE_AFTER_ENTRIES:
            # Deleted sandboxes leave entries behind: keep only those still inside their interval.
            self._written = {key: at for key, at in self._written.items() if now - at < self._interval}
        task = asyncio.get_running_loop().create_task(self._write(sandbox_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, sandbox_id: str) -> None:
        try:
            await kv_put(self._kv, sandbox_id, SandboxActivity(sandbox_id=sandbox_id))
        except Exception as error:  # a lost write only delays an auto-stop; the next use writes again
            self._written.pop(sandbox_id, None)
            log.warning("activity.write_failed", sandbox_id=sandbox_id, error=str(error))
