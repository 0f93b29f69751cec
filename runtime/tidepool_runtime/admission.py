"""Bounded admission on the toolbox path (proxy → runner → daemon; issue #10 "back-pressure").

Offered more than it can serve, the toolbox path used to queue without bound in every hop (p50 41 s at
twice its capacity). Now each hop (each proxy process, each runner process) bounds the toolbox requests it
relays at once (`capacity`). A request that finds every slot taken waits for one at most `queue_wait`
seconds, in a queue of at most `queue_length` requests (so a burst is absorbed, a sustained overload is not);
otherwise it is refused before it costs anything downstream: 503 with `Retry-After` (whole seconds) and
the toolbox error envelope, whose `message` says which hop is full. The SDK raises
`DaytonaServiceUnavailableError` (status_code 503, `headers["retry-after"]`). Admitted requests keep the
latency of a path that is not overloaded: at most `capacity` of them compete for the cores.

Long-lived requests never hold a slot forever:
- exempt (never counted, never refused): WebSocket upgrades (PTY, interpreter, session log streams), log
  follows (`?follow=true`) and streamed file transfers (downloads, uploads:
  `tidepool_contracts.toolbox_routes.is_long_lived`): open as long as their data or user needs, and what
  they cost is bandwidth, not request handling;
- counted, for at most `hold` seconds: every other request (e.g. an `exec`) holds its slot until its
  response is complete or `hold` seconds passed, whichever is first. One still running after that is
  waiting on the sandbox (a long command), not on the path, so its slot goes to the next request
  (counted in `released_early`). `hold` 0: the slot is held until the response is complete.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from tidepool_contracts.toolbox_routes import is_long_lived
from tidepool_runtime.relay import error_response, is_websocket_upgrade

REFUSED_STATUS = 503


@dataclass
class Admission:
    """Concurrency limit of one hop. `capacity`: requests in flight at most (0: unbounded); `queue_wait`:
    seconds a request may wait for a slot (0: refused at once); `queue_length`: requests waiting at most
    (None: `capacity`); `hold`: seconds a request keeps its slot
    at most (0: until its response is complete); `retry_after_seconds`: the `Retry-After` of a refusal;
    `hop`: named in the refusal's message ("toolbox proxy", "runner"). Counters only grow: `admitted`,
    `refused`, `released_early`. One event loop: no lock needed."""

    capacity: int
    queue_wait: float = 0.0
    queue_length: int | None = None
    hold: float = 0.0
    retry_after_seconds: int = 1
    hop: str = "toolbox path"
    in_flight: int = 0
    admitted: int = 0
    refused: int = 0
    released_early: int = 0
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque, repr=False)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        """Take a free slot (True) without waiting; False if none is free or others wait for one."""
        if self.capacity > 0 and (self.in_flight >= self.capacity or self._waiters):
            return False
        self.in_flight += 1
        self.admitted += 1
        return True

    async def enter(self) -> bool:
        """Take a slot, waiting for one up to `queue_wait` seconds in a queue of at most `queue_length`
        requests; False (counted in `refused`) if none came. A slot given back is handed to the longest
        waiting request, first come first served."""
        if self.try_enter():
            return True
        longest = self.capacity if self.queue_length is None else self.queue_length
        if self.queue_wait <= 0 or len(self._waiters) >= longest:
            self.refused += 1
            return False
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(handed)
        try:
            await asyncio.wait((handed,), timeout=self.queue_wait)
        except asyncio.CancelledError:  # the client went away while waiting
            if handed.done():
                self.leave()  # the slot was handed to us just now: pass it on
            else:
                self._waiters.remove(handed)
            raise
        if handed.done():
            self.admitted += 1
            return True
        self._waiters.remove(handed)
        self.refused += 1
        return False

    def leave(self) -> None:
        """Give back a slot: to the longest waiting request, else free it."""
        if self.in_flight <= 0:
            raise RuntimeError("admission slot released twice")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; in_flight stays
                return
        self.in_flight -= 1

    def refusal(self, request: web.Request) -> web.Response:
        """The 503 for a refused request: toolbox envelope plus `Retry-After`."""
        response = error_response(
            request,
            REFUSED_STATUS,
            f"the {self.hop} is at capacity ({self.capacity} toolbox requests in flight); "
            f"retry after {self.retry_after_seconds} s",
        )
        response.headers["Retry-After"] = str(self.retry_after_seconds)
        return response


class _Slot:
    """One admitted request's slot, given back once: when the request completes or `hold` runs out."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = True
        self.timer: asyncio.TimerHandle | None = None
        if admission.hold > 0:
            self.timer = asyncio.get_running_loop().call_later(admission.hold, self._expire)

    def _expire(self) -> None:
        if self.held:
            self.admission.released_early += 1
            self.release()

    def release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.held:
            self.held = False
            self.admission.leave()


def is_exempt(request: web.Request, toolbox_path: str) -> bool:
    """True for a long-lived request (see the module docstring). `toolbox_path`: the raw path after the
    sandbox's toolbox prefix, a route of the toolbox table."""
    if is_websocket_upgrade(request):
        return True
    follow = request.rel_url.query.get("follow", "").lower() in ("true", "1")
    return is_long_lived(request.method, toolbox_path, follow)


async def admitted(
    admission: Admission,
    request: web.Request,
    toolbox_path: str,
    handler: Callable[[], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """`handler()` if `request` is exempt or gets a slot (given back when the handler returns, i.e. when
    its response is complete, since the relay streams it before returning; or after `hold`); else the
    refusal."""
    if is_exempt(request, toolbox_path):
        return await handler()
    if not await admission.enter():
        return admission.refusal(request)
    slot = _Slot(admission)
    try:
        return await handler()
    finally:
        slot.release()
