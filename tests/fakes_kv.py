"""An in-memory stand-in for a NATS KV bucket (the calls tidepool_runtime.broker's kv helpers make)."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError


@dataclass
class Entry:
    key: str
    value: bytes | None
    operation: str | None = None


class MemoryKV:
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def get(self, key: str) -> Entry:
        if key not in self.entries:
            raise KeyNotFoundError
        return Entry(key, self.entries[key])

    async def put(self, key: str, value: bytes) -> int:
        self.entries[key] = value
        return len(self.entries)

    async def delete(self, key: str) -> bool:
        if key not in self.entries:
            raise KeyNotFoundError
        del self.entries[key]
        return True

    async def keys(self) -> list[str]:
        return list(self.entries)
