"""Build logs from the bus, replayed from the start and followed live while the build runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from tidepool_contracts import subjects
from tidepool_contracts.models import BuildLogLine
from tidepool_runtime.bus import Bus, decode

# While idle, how often the caller's "is the build over?" check runs.
IDLE_CHECK_SECONDS = 2.0


async def stream_build_log(
    bus: Bus, image_ref: str, follow: bool, build_finished: Callable[[], Awaitable[bool]]
) -> AsyncIterator[bytes]:
    """Yield the log of every build attempt of `image_ref`; with `follow`, keep going until the build ends."""
    queue: asyncio.Queue[tuple[BuildLogLine, int]] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        pending = msg.metadata.num_pending if msg.metadata else 0
        await queue.put((decode(BuildLogLine, msg.data), pending))

    subscription = await bus.js.subscribe(
        subjects.build_log(image_ref),
        cb=on_message,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        stream=subjects.BUILD_LOGS_STREAM,
    )
    caught_up = False
    try:
        info = await bus.js.stream_info(
            subjects.BUILD_LOGS_STREAM, subjects_filter=subjects.build_log(image_ref)
        )
        caught_up = not (info.state.subjects or {}).get(subjects.build_log(image_ref))
        while True:
            try:
                idle = IDLE_CHECK_SECONDS if follow else 0.5
                line, pending = await asyncio.wait_for(queue.get(), timeout=idle)
            except TimeoutError:
                if (caught_up and not follow) or await build_finished():
                    return
                continue
            if line.text:
                yield line.text.encode()
            caught_up = pending == 0
            if caught_up and (line.done or not follow):
                return
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
