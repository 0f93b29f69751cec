"""Build logs from the bus, replayed from the start and followed live while the build runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from tidepool_contracts import channels
from tidepool_contracts.models import BuildLogLine
from tidepool_contracts.subjects import kv_safe
from tidepool_runtime.broker import Bus, follow_subject, subject_has_messages

# While idle, how often the caller's "is the build over?" check runs.
IDLE_CHECK_SECONDS = 2.0


async def stream_build_log(
    bus: Bus, image_ref: str, follow: bool, build_finished: Callable[[], Awaitable[bool]]
) -> AsyncIterator[bytes]:
    """Yield the log of every build attempt of `image_ref`; with `follow`, keep going until the build ends."""
    queue: asyncio.Queue[tuple[BuildLogLine, int]] = asyncio.Queue()

    async def on_line(line: BuildLogLine, pending: int) -> None:
        await queue.put((line, pending))

    subject = channels.BUILD_LOG_LINES.address(image=kv_safe(image_ref))
    stop = await follow_subject(bus, channels.BUILD_LOG_LINES, subject, on_line)
    try:
        caught_up = not await subject_has_messages(bus, channels.BUILD_LOG_LINES, subject)
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
        await stop()
