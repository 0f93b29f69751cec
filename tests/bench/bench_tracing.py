"""What tracing costs on the toolbox path: `exec("true")` with tracing on (the proxy and the runner record
spans, the daemon reports its timing, everything is exported over OTLP to an in-memory collector) and off
(TIDEPOOL_TRACING_ENABLED=false: no spans, no trace context), alternating rounds, proxy and runner restarted
between them. Prints both medians and their ratio."""

from __future__ import annotations

import os
import statistics
import time

from daytona import Daytona, Sandbox

from tests.integration.spans import SpanCollector
from tests.integration.stackthread import StackThread
from tests.polling import wait_until

EXECS = int(os.environ.get("BENCH_TRACING_EXECS", "150"))
ROUNDS = 2  # off, on, off, on: a drift of the machine's load hits both alike
TRACED_SERVICES = ("proxy", "runner")


def _switch(stack: StackThread, sandbox: Sandbox, collector: SpanCollector, on: bool) -> None:
    """Restart the proxy and the runner with tracing on (exporting to `collector`) or off, then wait
    until the sandbox answers again."""
    for service in TRACED_SERVICES:
        overrides = stack.stack.service_overrides.setdefault(service, {})
        overrides["TIDEPOOL_TRACING_ENABLED"] = "true" if on else "false"
        overrides["TIDEPOOL_OTLP_ENDPOINT"] = collector.url if on else ""
        stack.kill(service)
        stack.restart(service)

    def answers() -> bool:
        try:
            return sandbox.process.exec("true").exit_code == 0
        except Exception:  # the runner or the proxy is still starting
            return False

    wait_until(answers, "the sandbox never answered after the restart", timeout=120, interval=0.2)


def _execs(sandbox: Sandbox) -> list[float]:
    for _ in range(10):  # warm the connection pools
        sandbox.process.exec("true")
    samples: list[float] = []
    for _ in range(EXECS):
        started = time.perf_counter()
        sandbox.process.exec("true")
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def bench_tracing(daytona: Daytona, stack: StackThread) -> list[str]:
    collector = SpanCollector()
    collector.start()
    sandbox = daytona.create()
    off: list[float] = []
    on: list[float] = []
    try:
        for _ in range(ROUNDS):
            _switch(stack, sandbox, collector, on=False)
            off += _execs(sandbox)
            _switch(stack, sandbox, collector, on=True)
            on += _execs(sandbox)
    finally:
        _switch(stack, sandbox, collector, on=True)  # as the stack was started: the default
        for service in TRACED_SERVICES:
            stack.stack.service_overrides.pop(service, None)
        daytona.delete(sandbox)
        collector.stop()
    off_median, on_median = statistics.median(off), statistics.median(on)
    name = 'exec("true") tracing off / on'
    return [
        f"{name:<32} n={len(off)}+{len(on)}  median off={off_median:6.2f} ms  "
        f"on={on_median:6.2f} ms  ratio on/off={on_median / off_median:5.2f}x  "
        f"({len(collector.snapshot())} spans exported)"
    ]
