"""Everything a request handler needs, built once at start-up."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from tidepool_api.auth import Authenticator
from tidepool_api.db import Database
from tidepool_api.ratelimit import RateLimiter
from tidepool_api.secrets_box import SecretBox
from tidepool_runtime import sealing
from tidepool_runtime.broker import Bus, KeyValue
from tidepool_runtime.settings import ApiSettings


@dataclass
class StateWaiters:
    """In-process wake-ups for requests waiting on a sandbox's state (POST /sandbox waits for `started`)."""

    _events: dict[str, set[asyncio.Event]] = field(default_factory=lambda: defaultdict(set))

    def register(self, sandbox_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._events[sandbox_id].add(event)
        return event

    def unregister(self, sandbox_id: str, event: asyncio.Event) -> None:
        waiting = self._events.get(sandbox_id)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._events[sandbox_id]

    def notify(self, sandbox_id: str) -> None:
        for event in self._events.get(sandbox_id, ()):
            event.set()


@dataclass
class ApiContext:
    settings: ApiSettings
    database: Database
    bus: Bus
    desired_kv: KeyValue
    api_keys_kv: KeyValue
    authenticator: Authenticator
    secret_box: SecretBox | None = None
    # Bound on first use (tidepool_api.previews).
    previews_kv: KeyValue | None = None
    signed_previews_kv: KeyValue | None = None
    ssh_access_kv: KeyValue | None = None  # tidepool_api.ssh_access
    organization_telemetry_kv: KeyValue | None = None  # tidepool_api.otel_config
    runners_kv: KeyValue | None = None  # tidepool_api.runners
    runner_controls_kv: KeyValue | None = None  # tidepool_api.runners
    waiters: StateWaiters = field(default_factory=StateWaiters)
    rate_limiter: RateLimiter | None = None  # None: no rate limits (unit tests)
    # Wake the webhook outbox relay (a commit recorded a change) and the deliverer (deliveries were made).
    webhook_outbox_wake: asyncio.Event = field(default_factory=asyncio.Event)
    webhook_delivery_wake: asyncio.Event = field(default_factory=asyncio.Event)

    @cached_property
    def signing_sealer(self) -> sealing.Sealer:
        """Seals signing keys for the proxy (the only other holder of the key)."""
        key = sealing.load_seal_key(
            self.settings.signing_seal_key, self.settings.data_dir, sealing.SIGNING_KEYS
        )
        return sealing.Sealer(key, sealing.SIGNING_KEYS)

    @cached_property
    def registry_sealer(self) -> sealing.Sealer:
        """Seals registry passwords for the builder (the only other holder of the key)."""
        configured = self.settings.registry_seal_key
        key = sealing.load_seal_key(configured, self.settings.data_dir, sealing.REGISTRY_CREDENTIALS)
        return sealing.Sealer(key, sealing.REGISTRY_CREDENTIALS)

    @cached_property
    def otel_sealer(self) -> sealing.Sealer:
        """Seals organizations' OTLP headers for the telemetry service (the only other holder of the key)."""
        key = sealing.load_seal_key(self.settings.otel_seal_key, self.settings.data_dir, sealing.OTEL_HEADERS)
        return sealing.Sealer(key, sealing.OTEL_HEADERS)
