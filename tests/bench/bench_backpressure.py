"""`BENCH_ONLY=backpressure`: the toolbox path past its capacity (issue #10, "back-pressure").

The issue's mixed load over 5 sandboxes: 70 % `exec("true")` through the proxy, 20 % sandbox get (API),
10 % file list through the proxy. Two phases:

1. capacity: BENCH_BP_WORKERS (default 8) closed-loop clients, each sending its next request when the
   last one answered, for BENCH_BP_CAPACITY_SECONDS (default 15): the completed requests per second are
   what this machine sustains (fewer workers than any admission limit, so nothing is refused);
2. overload: the same mix offered open-loop (each request on schedule, whether or not earlier ones
   answered) at twice that rate for BENCH_BP_SECONDS (default 60). Printed: refusals (503/429 with
   `Retry-After`) and how fast they came back (p50/p99), p50/p99 of the admitted requests by kind, other
   failures, and the RSS of the proxy and the runner at the start and the end of the phase.

The client is one asyncio loop (aiohttp, no connection limit, so requests queue in the platform, not in
the client) on the same machine as the stack: it competes with it for the cores, as in the issue's run.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from daytona import Daytona

from tests.bench.bench_transfer import rss_kib, service_pids
from tests.integration.stackthread import StackThread

SANDBOXES = 5
WORKERS = int(os.environ.get("BENCH_BP_WORKERS", "8"))
CAPACITY_SECONDS = float(os.environ.get("BENCH_BP_CAPACITY_SECONDS", "15"))
OVERLOAD_SECONDS = float(os.environ.get("BENCH_BP_SECONDS", "60"))
OVERLOAD_FACTOR = 2.0
MIX = (("exec", 0.7), ("get", 0.2), ("list", 0.1))
REFUSED = (429, 503)


@dataclass
class Results:
    """Latencies in ms by (kind, outcome); outcome: `ok`, `refused` or `failed:<status or error>`."""

    samples: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    refusals_without_retry_after: int = 0
    # Open loop: how late (ms) each request was sent after its due time (the client's own lag).
    send_lag_ms: list[float] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(len(values) for (_, result), values in self.samples.items() if result == outcome)

    def failures(self) -> dict[str, int]:
        found: dict[str, int] = defaultdict(int)
        for (kind, result), values in self.samples.items():
            if result.startswith("failed"):
                found[f"{kind} {result}"] += len(values)
        return dict(found)


class Load:
    def __init__(self, stack: StackThread, sandbox_ids: list[str]) -> None:
        self.stack = stack
        self.sandbox_ids = sandbox_ids
        self.headers = {"Authorization": f"Bearer {stack.api_key}"}
        self.random = random.Random(10)

    def pick(self) -> tuple[str, str]:
        kind = self.random.choices([name for name, _ in MIX], [weight for _, weight in MIX])[0]
        return kind, self.random.choice(self.sandbox_ids)

    async def one(self, http: aiohttp.ClientSession, results: Results) -> None:
        kind, sandbox_id = self.pick()
        toolbox = f"{self.stack.proxy_url}/toolbox/{sandbox_id}"
        started = time.perf_counter()
        try:
            if kind == "exec":
                answer = http.post(
                    f"{toolbox}/process/execute", json={"command": "true"}, headers=self.headers
                )
            elif kind == "list":
                answer = http.get(f"{toolbox}/files", params={"path": "/tmp"}, headers=self.headers)
            else:
                answer = http.get(f"{self.stack.api_url}/sandbox/{sandbox_id}", headers=self.headers)
            async with answer as response:
                await response.read()
                status, retry_after = response.status, response.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError) as error:
            outcome = f"failed:{type(error).__name__}"
        else:
            if status == 200:
                outcome = "ok"
            elif status in REFUSED:
                outcome = "refused"
                if retry_after is None:
                    results.refusals_without_retry_after += 1
            else:
                outcome = f"failed:{status}"
        results.samples[(kind, outcome)].append((time.perf_counter() - started) * 1000)


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
    )


async def closed_loop(load: Load, seconds: float) -> tuple[float, Results]:
    """Completed requests per second of WORKERS clients sending back to back."""
    results = Results()
    async with session() as http:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await load.one(http, results)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        elapsed = time.perf_counter() - started
    return results.count("ok") / elapsed, results


async def open_loop(load: Load, rate: float, seconds: float) -> tuple[float, Results]:
    """Requests started on schedule at `rate` per second for `seconds`; returns the time until the last
    one answered, and the results."""
    results = Results()
    async with session() as http:
        tasks: list[asyncio.Task[None]] = []
        started = time.perf_counter()
        interval = 1.0 / rate
        for index in range(int(rate * seconds)):
            due = started + index * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            results.send_lag_ms.append(max(0.0, time.perf_counter() - due) * 1000)
            tasks.append(asyncio.create_task(load.one(http, results)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return elapsed, results


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (Linux /proc/stat)."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def percentiles(values: list[float]) -> str:
    if not values:
        return "n=0"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return f"n={len(ordered):<6} p50={statistics.median(ordered):8.1f} ms  p99={p99:8.1f} ms"


def bench_backpressure(daytona: Daytona, stack: StackThread) -> list[str]:
    sandboxes = [daytona.create() for _ in range(SANDBOXES)]
    try:
        for sandbox in sandboxes:
            sandbox.process.exec("true")
        load = Load(stack, [sandbox.id for sandbox in sandboxes])
        pids = service_pids(stack)
        cpu_pids = {**pids, "api": stack.stack.children["api"].process.pid, "client": os.getpid()}

        capacity, measured = asyncio.run(closed_loop(load, CAPACITY_SECONDS))
        rate = OVERLOAD_FACTOR * capacity
        rss_start = {name: rss_kib(pid) / 1024 for name, pid in pids.items()}
        cpu_start = {name: cpu_seconds(pid) for name, pid in cpu_pids.items()}
        machine_start = machine_busy()
        elapsed, results = asyncio.run(open_loop(load, rate, OVERLOAD_SECONDS))
        cpu_used = {name: cpu_seconds(pid) - cpu_start[name] for name, pid in cpu_pids.items()}
        machine_end = machine_busy()
        rss_end = {name: rss_kib(pid) / 1024 for name, pid in pids.items()}
    finally:
        for sandbox in sandboxes:
            daytona.delete(sandbox)

    offered = int(rate * OVERLOAD_SECONDS)
    refused = [
        value for (_, outcome), values in results.samples.items() if outcome == "refused" for value in values
    ]
    lines = [
        f"backpressure: mix 70% exec / 20% get / 10% list over {SANDBOXES} sandboxes",
        f"  capacity ({WORKERS} closed-loop clients, {CAPACITY_SECONDS:.0f} s): {capacity:.0f} req/s, "
        f"refused {measured.count('refused')}, failed {sum(measured.failures().values())}",
    ]
    for kind, _ in MIX:
        lines.append(f"    {kind:<5} {percentiles(measured.samples[(kind, 'ok')])}")
    lines += [
        f"  overload: offered {rate:.0f} req/s (2x) for {OVERLOAD_SECONDS:.0f} s = {offered} requests, "
        f"all answered after {elapsed:.1f} s; completed ok {results.count('ok')} "
        f"({results.count('ok') / elapsed:.0f}/s)",
        f"    refused (503/429) {len(refused)} ({100 * len(refused) / offered:.1f} %), "
        f"without Retry-After {results.refusals_without_retry_after}: {percentiles(refused)}",
    ]
    for kind, _ in MIX:
        lines.append(f"    admitted {kind:<5} {percentiles(results.samples[(kind, 'ok')])}")
    admitted_toolbox = results.samples[("exec", "ok")] + results.samples[("list", "ok")]
    lines.append(f"    admitted toolbox (exec+list) {percentiles(admitted_toolbox)}")
    lines.append(f"    other failures: {results.failures() or 'none'}")
    lines.append(
        "    RSS start -> end: "
        + ", ".join(f"{name} {rss_start[name]:.1f} -> {rss_end[name]:.1f} MiB" for name in sorted(pids))
    )
    lines.append(
        "    CPU during overload (cores busy on average): "
        + ", ".join(f"{name} {seconds / elapsed:.2f}" for name, seconds in cpu_used.items())
        + " (client: this process, with the stack's log pumps); whole machine "
        + f"{100 * (machine_end[0] - machine_start[0]) / (machine_end[1] - machine_start[1]):.0f} % busy "
        + f"({os.cpu_count()} cores, other work included)"
    )
    lines.append(f"    client send lag (behind schedule) {percentiles(results.send_lag_ms)}")
    return lines
