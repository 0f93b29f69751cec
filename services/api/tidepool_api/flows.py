"""A sandbox's flow log, read back from the `TIDEPOOL_SANDBOX_FLOWS` stream (its runner publishes each new
connection its network policy allowed or denied: tidepool_runner/flowlog.py)."""

from __future__ import annotations

from collections import deque
from datetime import datetime

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tidepool_contracts import channels
from tidepool_contracts.models import SandboxFlow
from tidepool_runtime.broker import Bus, decode

FETCH_BATCH = 1000
FETCH_TIMEOUT_SECONDS = 2.0


async def read_flows(bus: Bus, sandbox_id: str, since: datetime | None, limit: int) -> list[SandboxFlow]:
    """The newest `limit` flows of the sandbox (from `since` on, if given), oldest first."""
    assert channels.SANDBOX_FLOWS.stream is not None
    stream = channels.SANDBOX_FLOWS.stream.name
    subject = channels.SANDBOX_FLOWS.address(sandbox_id=sandbox_id)
    js = bus.jetstream
    info = await js.stream_info(stream, subjects_filter=subject)
    if not (info.state.subjects or {}).get(subject):
        return []
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL if since is None else DeliverPolicy.BY_START_TIME,
        opt_start_time=None if since is None else since.isoformat(),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    subscription = await js.pull_subscribe(subject, stream=stream, config=config)
    newest: deque[SandboxFlow] = deque(maxlen=limit)
    try:
        if (await subscription.consumer_info()).num_pending == 0:
            return []
        while True:
            messages = await subscription.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_SECONDS)
            newest.extend(decode(SandboxFlow, message.data) for message in messages)
            if not messages or messages[-1].metadata.num_pending == 0:
                return list(newest)
    finally:
        await subscription.unsubscribe()
