"""Leader election of scheduler replicas: a lease in the `tidepool_scheduler_lease` KV bucket (issue #17).

Why a KV lease and not consumer semantics: intents already go to one replica at a time (every replica pulls
from the one durable consumer `scheduler-intents`; JetStream hands each message to one puller until it is
acked or its ack wait passes, and handling is idempotent), but reconciliation and lifecycle timers are
loops over whole buckets that no message triggers; two replicas running them would act twice on a sandbox
(two auto-stops, two re-sends). So only the lease holder runs them.

How (compare-and-set on the key's revision, no clocks compared between machines):
- no key (first start, or the last leader stepped down and deleted it): `create` — exactly one replica wins;
- the leader rewrites it every `lease / 3` seconds with `update(last=its revision)`; a refused update means
  another replica took over: it stops leading at once;
- a follower that sees the same revision unchanged for `lease` seconds (its own monotonic clock, from the
  moment it first saw that revision) takes over with `update(last=that revision)`; of several followers one
  wins;
- the leader counts itself leader only until `lease` seconds after it *sent* its last successful renewal, so
  by the time a follower can take over (at least `lease` after it saw that write) the old leader has stopped,
  even if it is cut off from NATS (clock rates assumed equal, not clocks).
A leader stopped gracefully deletes the key (compare-and-set), so a follower takes over at its next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from tidepool_contracts.models import SchedulerLease
from tidepool_runtime.broker import KeyValue, encode

log = structlog.get_logger("tidepool.scheduler.leader")

KEY = "leader"


class LeaderLease:
    def __init__(self, kv: KeyValue, holder: str, lease_seconds: float) -> None:
        self.kv = kv
        self.holder = holder
        self.lease = lease_seconds
        self._revision = 0  # of our own lease entry while we lead
        self._valid_until = 0.0  # monotonic
        self._seen: tuple[int, float] = (-1, 0.0)  # (someone else's revision, when we first saw it)

    @property
    def is_leader(self) -> bool:
        return self._revision > 0 and time.monotonic() < self._valid_until

    def _value(self) -> bytes:
        return encode(SchedulerLease(holder=self.holder))

    def _lead(self, revision: int, sent: float) -> None:
        was = self.is_leader
        self._revision, self._valid_until = revision, sent + self.lease
        if not was:
            log.info("scheduler.leading", holder=self.holder)

    def _follow(self, why: str) -> None:
        if self._revision:
            log.warning("scheduler.not_leading", holder=self.holder, reason=why)
        self._revision = 0

    async def step(self) -> None:
        """One round: renew the lease, or take it if it is free or was left unrenewed for a lease."""
        sent = time.monotonic()
        if self._revision:
            try:
                self._lead(await self.kv.update(KEY, self._value(), last=self._revision), sent)
            except KeyWrongLastSequenceError:
                self._follow("another replica holds the lease")
            if self._revision and not self.is_leader:
                self._follow("lease expired unrenewed")
            return
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:  # never held, or deleted by a leader that stepped down
            entry = None
        if entry is None or entry.operation in ("DEL", "PURGE") or not entry.value:
            with contextlib.suppress(KeyWrongLastSequenceError):  # another replica created it first
                self._lead(await self.kv.create(KEY, self._value()), sent)
            return
        revision = entry.revision or 0
        if self._seen[0] != revision:
            self._seen = (revision, sent)
            return
        if sent - self._seen[1] >= self.lease:
            with contextlib.suppress(KeyWrongLastSequenceError):  # renewed meanwhile, or another took it
                self._lead(await self.kv.update(KEY, self._value(), last=revision), sent)
                log.info("scheduler.took_over", holder=self.holder, unrenewed=round(sent - self._seen[1], 1))

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Keep campaigning / renewing every `lease / 3` seconds until `stop`; then step down."""
        while not stop.is_set():
            try:
                await self.step()
            except Exception as error:  # NATS unreachable: leadership lapses by itself (is_leader)
                log.warning("scheduler.lease_failed", error=str(error))
                if self._revision and not self.is_leader:
                    self._follow("lease expired unrenewed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.lease / 3)
        await self.step_down()

    async def step_down(self) -> None:
        """Give the lease up at once (delete it if it is still ours) so a follower needs not wait a lease."""
        if not self._revision:
            return
        revision, self._revision = self._revision, 0
        with contextlib.suppress(Exception):
            await self.kv.delete(KEY, last=revision)
        log.info("scheduler.stepped_down", holder=self.holder)
