"""The one place tests may sleep: poll an observable condition until it holds, with a generous deadline.

Tests wait on outcomes (a file appears, a process is gone, a state is reached), never for a fixed time, so
a slow machine makes a test slower, not vacuous or flaky. `tests/unit/test_no_timing_in_tests.py` enforces
that `time.sleep` / `asyncio.sleep` appear nowhere else in test code.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_INTERVAL_SECONDS = 0.05


def wait_until(
    condition: Callable[[], T],
    message: str | Callable[[], str] = "condition never held",
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    interval: float = DEFAULT_INTERVAL_SECONDS,
) -> T:
    """Call `condition()` every `interval` seconds until it returns a truthy value, and return that value.

    Raises AssertionError(`message`) when `timeout` seconds pass first; exceptions from `condition`
    propagate (catch them inside it when they mean "not yet")."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], T | Awaitable[T]],
    message: str | Callable[[], str] = "condition never held",
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    interval: float = DEFAULT_INTERVAL_SECONDS,
) -> T:
    """`wait_until` for event-loop code: `condition` may be a plain function or return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(interval)


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a killed child not yet reaped is dead for tests)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may itself contain spaces or parentheses.
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_until_dead(pids: list[int], what: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Wait until none of `pids` is alive; AssertionError naming the survivors otherwise."""
    wait_until(
        lambda: not any(process_alive(pid) for pid in pids),
        lambda: f"{what}: still alive: {[pid for pid in pids if process_alive(pid)]}",
        timeout=timeout,
    )
