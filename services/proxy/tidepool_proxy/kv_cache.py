"""In-memory mirror of a NATS KV bucket, kept current by a watch: hot-path lookups cost no round trip."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

import structlog
from pydantic import BaseModel

from tidepool_runtime.broker import KeyValue, kv_get, kv_watch

log = structlog.get_logger("tidepool.proxy.cache")

ModelT = TypeVar("ModelT", bound=BaseModel)

# A key found nowhere is remembered briefly, so junk ids can't turn every request into a NATS round trip.
MISS_TTL_SECONDS = 1.0
MAX_REMEMBERED_MISSES = 10_000
WATCH_RESTART_DELAY_SECONDS = 1.0


class KvCache(Generic[ModelT]):
    def __init__(self, kv: KeyValue, model_type: type[ModelT], name: str) -> None:
        self._kv = kv
        self._model_type = model_type
        self._name = name
        self._entries: dict[str, ModelT] = {}
        self._misses: dict[str, float] = {}  # key -> monotonic time until which the miss is trusted
        self._changes_applied = 0
        self._refreshed: dict[str, float] = {}  # key -> monotonic time before which refresh() reads no more

    def apply(self, key: str, value: ModelT | None) -> None:
        """One change from the watch (None = deleted). The watch is the authority: it overrides misses."""
        self._changes_applied += 1
        self._misses.pop(key, None)
        if value is None:
            self._entries.pop(key, None)
        else:
            self._entries[key] = value

    async def watch_forever(self) -> None:
        while True:
            try:
                async for key, value in kv_watch(self._kv, self._model_type):
                    self.apply(key, value)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # reconnects and server restarts: resubscribe (replays current values)
                log.warning("cache.watch_failed", bucket=self._name, error=str(error))
            await asyncio.sleep(WATCH_RESTART_DELAY_SECONDS)

    async def refresh(self, key: str) -> ModelT | None:
        """A direct read, replacing the cached value: for a refusal the cache may have caused (an entry
        changed just now whose change the watch has not delivered yet, e.g. a claimed warm-pool sandbox's
        new owner). At most once per key per MISS_TTL_SECONDS (else the cached value): refused requests
        must not turn into a NATS round trip each."""
        loop = asyncio.get_running_loop()
        if self._refreshed.get(key, 0.0) > loop.time():
            return self._entries.get(key)
        if len(self._refreshed) >= MAX_REMEMBERED_MISSES:
            self._refreshed.clear()
        self._refreshed[key] = loop.time() + MISS_TTL_SECONDS
        changes_before = self._changes_applied
        value = await kv_get(self._kv, key, self._model_type)
        if self._changes_applied != changes_before:
            return self._entries.get(key, value)
        self._misses.pop(key, None)
        if value is None:
            self._entries.pop(key, None)
        else:
            self._entries[key] = value
        return value

    async def get(self, key: str) -> ModelT | None:
        """The cached value; on a miss one direct read, because the watch may lag a write made just now."""
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        trusted_until = self._misses.get(key)
        if trusted_until is not None and trusted_until > loop.time():
            return None
        changes_before = self._changes_applied
        value = await kv_get(self._kv, key, self._model_type)
        if self._changes_applied != changes_before:
            # The watch delivered meanwhile (maybe this very key, maybe its deletion): it is at least as new
            # as our read, so answer from it and remember nothing of ours.
            return self._entries.get(key, value)
        if value is not None:
            self._entries[key] = value
            return value
        if len(self._misses) >= MAX_REMEMBERED_MISSES:
            self._misses.clear()
        self._misses[key] = loop.time() + MISS_TTL_SECONDS
        return None
