"""Process toolbox latency through the official SDK: PTY keystroke echo and session exec round trips.

`bench_process(daytona)` returns the lines to print (medians and p95 in milliseconds); `main()` runs it
against a stack this script starts, like `bench_spine.py`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator

from daytona import Daytona, PtySize, SessionExecuteRequest

PTY_ECHOES = int(os.environ.get("BENCH_PTY_ECHOES", "200"))
DEADLINE_RUNS = int(os.environ.get("BENCH_DEADLINE_RUNS", "5"))
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


def bench_deadlines(daytona: Daytona) -> list[str]:
    """The figures the tests used to assert (issue #18): how soon exec answers while a background child
    holds its pipe, how late a timeout answers after its deadline (exec, code_run, interpreter), how fast a
    quick exec answers while a long one runs, and Ctrl-C to the next prompt in a PTY."""
    sandbox = daytona.create()
    try:
        process = sandbox.process
        process.exec("true")
        background_ms = []
        for _ in range(DEADLINE_RUNS):
            started = time.perf_counter()
            process.exec("sleep 30 >/dev/null 2>&1 &\necho started")
            background_ms.append((time.perf_counter() - started) * 1000)
        process.exec("pkill -x sleep || true")

        def overshoot_ms(action: Callable[[], object]) -> float:
            started = time.perf_counter()
            with contextlib.suppress(Exception):  # every one of them ends in a timeout error
                action()
            return (time.perf_counter() - started - 1.0) * 1000

        exec_over = [overshoot_ms(lambda: process.exec("sleep 30", timeout=1)) for _ in range(DEADLINE_RUNS)]
        code_over = [
            overshoot_ms(lambda: process.code_run("import time\ntime.sleep(30)", timeout=1))
            for _ in range(DEADLINE_RUNS)
        ]
        interpreter = sandbox.code_interpreter
        interpreter_over = [
            overshoot_ms(lambda: interpreter.run_code("import time\ntime.sleep(30)", timeout=1))
            for _ in range(DEADLINE_RUNS)
        ]

        long_exec = threading.Thread(target=lambda: process.exec("sleep 20", timeout=60))
        long_exec.start()
        while process.exec("pgrep -x sleep >/dev/null && echo yes").result != "yes\n":
            pass  # until the long exec runs
        beside_ms = []
        for _ in range(DEADLINE_RUNS * 4):
            started = time.perf_counter()
            process.exec("true")
            beside_ms.append((time.perf_counter() - started) * 1000)
        long_exec.join()

        handle = process.create_pty_session("bench-ctrl-c", pty_size=PtySize(rows=24, cols=200))
        events = iter(handle)
        handle.send_input("PS1='ready> '\n")
        _read_until(events, b"ready> ")
        interrupt_ms = []
        for _ in range(DEADLINE_RUNS):
            handle.send_input("sh -c 'printf \"fg-%s\\n\" on; exec sleep 300'\n")
            _read_until(events, b"fg-on")
            started = time.perf_counter()
            handle.send_input(b"\x03")
            _read_until(events, b"ready> ")
            interrupt_ms.append((time.perf_counter() - started) * 1000)
        handle.kill()
        handle.disconnect()
    finally:
        daytona.delete(sandbox)
    return [
        summary("exec with a background child", background_ms),
        summary("exec timeout=1 s: answer after", exec_over),
        summary("code_run timeout=1 s: answer after", code_over),
        summary("run_code timeout=1 s: answer after", interpreter_over),
        summary("exec beside a long exec", beside_ms),
        summary("PTY Ctrl-C to the next prompt", interrupt_ms),
    ]


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack(
        [
            ("process", lambda daytona, _stack: bench_process(daytona)),
            ("deadlines", lambda daytona, _stack: bench_deadlines(daytona)),
        ]
    )


if __name__ == "__main__":
    main()
