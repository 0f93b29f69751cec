"""Per-sandbox ordering inside one process: the runner's jobs and the scheduler's intents for one sandbox are
handled one at a time, in arrival order; other sandboxes' in parallel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class SandboxLocks:
    """One FIFO lock per sandbox: its jobs run strictly in arrival order; other sandboxes' run in parallel."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, sandbox_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(sandbox_id, asyncio.Lock())
        self._holders[sandbox_id] = self._holders.get(sandbox_id, 0) + 1
        try:
            # asyncio.Lock queues waiters in call order, which is the order the jobs were fetched.
            async with lock:
                yield
        finally:
            self._holders[sandbox_id] -= 1
            if self._holders[sandbox_id] == 0:
                del self._holders[sandbox_id]
                del self._locks[sandbox_id]

    def queued(self, sandbox_id: str) -> bool:
        """Whether someone waits for the sandbox's lock besides its holder (a job the holder delays)."""
        return self._holders.get(sandbox_id, 0) > 1
