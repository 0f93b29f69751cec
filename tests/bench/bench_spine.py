"""`make bench`: latency of the spine through the official SDK, against a stack this script starts.

Prints medians and p95 in milliseconds. Targets (later issues): create→first exec ≤ 500 ms, exec ≤ 8 ms.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from daytona import Daytona

from tests.integration.stackthread import StackThread

CREATES = int(os.environ.get("BENCH_CREATES", "20"))
EXECS = int(os.environ.get("BENCH_EXECS", "200"))


def summary(name: str, samples_ms: list[float], target_ms: float) -> str:
    ordered = sorted(samples_ms)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    median = statistics.median(ordered)
    return (
        f"{name:<32} n={len(ordered):<4} median={median:8.1f} ms  p95={p95:8.1f} ms  "
        f"target={target_ms:.0f} ms  ratio={median / target_ms:5.2f}x"
    )


def bench(daytona: Daytona) -> list[str]:
    daytona.delete(daytona.create())  # warm caches: first image use, connection pools
    create_ms: list[float] = []
    for _ in range(CREATES):
        started = time.perf_counter()
        sandbox = daytona.create()
        sandbox.process.exec("true")
        create_ms.append((time.perf_counter() - started) * 1000)
        daytona.delete(sandbox)
    sandbox = daytona.create()
    try:
        sandbox.process.exec("true")
        exec_ms: list[float] = []
        for _ in range(EXECS):
            started = time.perf_counter()
            sandbox.process.exec("true")
            exec_ms.append((time.perf_counter() - started) * 1000)
    finally:
        daytona.delete(sandbox)
    return [
        summary("create -> first exec", create_ms, 500),
        summary('exec("true") round trip', exec_ms, 8),
    ]


BenchFunction = Callable[[Daytona, StackThread], list[str]]


def run_with_stack(benches: list[tuple[str, BenchFunction]]) -> None:
    """Start one stack, run every bench through the official SDK, print all figures at the end."""
    data_dir = Path(tempfile.mkdtemp(prefix="tidepool-bench-"))
    # The pool section sizes one pool for a burst of concurrent creates (up to 100 where cores allow).
    stack = StackThread(
        data_dir, extra_env={"TIDEPOOL_WARM_POOL_MAX": "100", "TIDEPOOL_WARM_POOL_MAX_MEMBERS": "100"}
    )
    print(f"starting a stack in {data_dir} …", flush=True)
    stack.start()
    lines: list[str] = []
    try:
        os.environ["DAYTONA_API_URL"] = stack.api_url
        os.environ["DAYTONA_API_KEY"] = stack.api_key
        daytona = Daytona()
        for name, bench_function in benches:
            print(f"running {name} …", flush=True)
            lines += bench_function(daytona, stack)
    finally:
        stack.stop()
    print("\nTidepool benchmark (official SDK 0.226.1, this machine)")
    for line in lines:
        print("  " + line)


def main() -> None:
    from tests.bench.bench_api import bench_api
    from tests.bench.bench_apioverhead import bench_apioverhead
    from tests.bench.bench_backpressure import bench_backpressure
    from tests.bench.bench_code import bench_code
    from tests.bench.bench_dashboard import bench_dashboard
    from tests.bench.bench_hops import bench_hops
    from tests.bench.bench_isolation import bench_isolation
    from tests.bench.bench_pool import bench_pool
    from tests.bench.bench_previews import bench_previews
    from tests.bench.bench_process import bench_deadlines, bench_process
    from tests.bench.bench_search import bench_search
    from tests.bench.bench_snapshots import bench_snapshots
    from tests.bench.bench_tracing import bench_tracing
    from tests.bench.bench_transfer import bench_transfer
    from tests.bench.bench_volumes import bench_volumes

    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    benches: list[tuple[str, BenchFunction]] = [
        ("spine", lambda daytona, _stack: bench(daytona)),
        ("api", lambda _daytona, stack: bench_api(stack)),
        ("apioverhead", lambda _daytona, stack: bench_apioverhead(stack)),
        ("process", lambda daytona, _stack: bench_process(daytona)),
        ("deadlines", lambda daytona, _stack: bench_deadlines(daytona)),
        ("code", lambda daytona, _stack: bench_code(daytona)),
        ("search", lambda daytona, _stack: bench_search(daytona)),
        ("transfer", bench_transfer),
        ("snapshots", lambda daytona, _stack: bench_snapshots(daytona)),
        ("isolation", lambda daytona, _stack: bench_isolation(daytona)),
        ("hops", bench_hops),
        ("previews", bench_previews),
        ("volumes", lambda daytona, _stack: bench_volumes(daytona)),
        ("tracing", bench_tracing),
        ("pool", bench_pool),
        ("dashboard", lambda _daytona, stack: bench_dashboard(stack)),
        ("backpressure", bench_backpressure),
    ]
    run_with_stack([(name, function) for name, function in benches if not only or name in only])


if __name__ == "__main__":
    main()
