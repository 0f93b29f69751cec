"""Process toolbox latency through the official SDK: PTY keystroke echo and session exec round trips.

`bench_process(daytona)` returns the lines to print (medians and p95 in milliseconds); `main()` runs it
against a stack this script starts, like `bench_spine.py`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator

from daytona import Daytona, PtySize, SessionExecuteRequest

PTY_ECHOES = int(os.environ.get("BENCH_PTY_ECHOES", "200"))
SESSION_EXECS = int(os.environ.get("BENCH_SESSION_EXECS", "200"))
READ_TIMEOUT_SECONDS = 10.0


def summary(name: str, samples_ms: list[float]) -> str:
    ordered = sorted(samples_ms)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"{name:<32} n={len(ordered):<4} median={statistics.median(ordered):8.2f} ms  p95={p95:8.2f} ms"


def _read_until(events: Iterator[bytes], needle: bytes) -> None:
    seen = b""
    deadline = time.monotonic() + READ_TIMEOUT_SECONDS
    while needle not in seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"PTY never echoed {needle!r}")
        seen = seen[-64:] + next(events)


def bench_process(daytona: Daytona) -> list[str]:
    sandbox = daytona.create()
    try:
        process = sandbox.process
        process.exec("true")

        handle = process.create_pty_session("bench-pty", pty_size=PtySize(rows=24, cols=200))
        events = iter(handle)
        handle.send_input("PS1='ready> '\n")
        _read_until(events, b"ready> ")
        echo_ms: list[float] = []
        for _ in range(PTY_ECHOES):
            started = time.perf_counter()
            handle.send_input(b"x")
            _read_until(events, b"x")
            echo_ms.append((time.perf_counter() - started) * 1000)
            handle.send_input(b"\x7f")  # erase it again so the line never wraps
            _read_until(events, b"\b")
        handle.kill()
        handle.disconnect()

        process.create_session("bench-session")
        request = SessionExecuteRequest(command="true")
        process.execute_session_command("bench-session", request)
        session_ms: list[float] = []
        for _ in range(SESSION_EXECS):
            started = time.perf_counter()
            process.execute_session_command("bench-session", request)
            session_ms.append((time.perf_counter() - started) * 1000)
        process.delete_session("bench-session")
    finally:
        daytona.delete(sandbox)
    return [
        summary("PTY keystroke echo", echo_ms),
        summary('session exec("true") round trip', session_ms),
    ]


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack([("process", lambda daytona, _stack: bench_process(daytona))])


if __name__ == "__main__":
    main()
