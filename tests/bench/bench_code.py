"""`make bench` (code): latency of `code_run` through the official SDK, against a stack this script starts.

Prints median and p95 in milliseconds for a python `print(1)` round trip (a fresh interpreter per call, as
upstream runs it) and, for comparison, the code interpreter's warm default context over its WebSocket.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from daytona import CreateSandboxFromSnapshotParams, Daytona

CODE_RUNS = int(os.environ.get("BENCH_CODE_RUNS", "100"))


def summary(name: str, samples_ms: list[float]) -> str:
    """Median and p95 (no target has been set for these yet)."""
    ordered = sorted(samples_ms)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    median = statistics.median(ordered)
    return f"{name:<32} n={len(ordered):<4} median={median:8.1f} ms  p95={p95:8.1f} ms"


def _timed(action: Callable[[], None], count: int) -> list[float]:
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def bench_code(daytona: Daytona) -> list[str]:
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(language="python"))
    try:
        warm = sandbox.process.code_run("print(1)")  # first use: page cache, connection pool
        assert warm.result == "1\n", warm.result

        def code_run() -> None:
            response = sandbox.process.code_run("print(1)")
            if response.exit_code != 0 or response.result != "1\n":
                raise RuntimeError(f"unexpected code_run result: {response.exit_code} {response.result!r}")

        code_run_ms = _timed(code_run, CODE_RUNS)

        interpreter = sandbox.code_interpreter
        interpreter.run_code("pass")  # starts the default context

        def run_code() -> None:
            result = interpreter.run_code("print(1)")
            if result.error is not None or result.stdout != "1\n":
                raise RuntimeError(f"unexpected run_code result: {result.stdout!r} {result.error}")

        interpreter_ms = _timed(run_code, CODE_RUNS)
    finally:
        daytona.delete(sandbox)
    return [
        summary('code_run("print(1)") python', code_run_ms),
        summary('run_code("print(1)") interpreter', interpreter_ms),
    ]


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack([("code", lambda daytona, _stack: bench_code(daytona))])


if __name__ == "__main__":
    main()
