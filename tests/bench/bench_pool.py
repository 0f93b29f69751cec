"""`BENCH_ONLY=pool`: creates through the official SDK (AsyncDaytona), cold and from a warm pool, beside the
raw container engine underneath (Docker API on the stack's own Podman socket, same image), in the same run.

Figures (create → first `exec("true")`, milliseconds):
- raw engine: create + start + exec of a container of the default image, one at a time and 20 at once;
- 20 concurrent cold creates (no pool) vs the raw engine's 20 concurrent: p50 ratio (target ≤ 1.3x);
- warm-pool create → first exec, one at a time, each a claim (target p50 ≤ 30 ms, p95 ≤ 80 ms);
- a burst of concurrent creates with a pool sized for it (target p50 ≤ 300 ms, p95 ≤ 600 ms, 100 %).
  The issue asks for 100; a runner admits 4x its cores in sandbox CPUs, so on a small machine the burst is
  sized down to what fits (`BENCH_POOL_BURST`, default 6 on ≤ 2 cores) and the line says so.

Each claim is checked to be one (the sandbox's id was a pool member, `GET /sandbox?includeWarm=true`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from datetime import datetime

import aiodocker
import httpx
from daytona import AsyncDaytona, Daytona, DaytonaConfig

from tests.integration.stackthread import StackThread

SNAPSHOT = "daytona-small"
RAW_IMAGE = os.environ.get("BENCH_RAW_IMAGE", "localhost/tidepool/default:0.3.0")
SEQUENTIAL = int(os.environ.get("BENCH_POOL_SEQUENTIAL", "20"))
CONCURRENT = int(os.environ.get("BENCH_POOL_CONCURRENT", "20"))
CORES = os.cpu_count() or 1
BURST = int(os.environ.get("BENCH_POOL_BURST", "6" if CORES <= 2 else "100"))
SETTLE_SECONDS = 300.0


def p50_p95(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return statistics.median(ordered), ordered[max(0, round(0.95 * len(ordered)) - 1)]


def line(name: str, samples_ms: list[float], extra: str = "") -> str:
    if not samples_ms:
        return f"{name:<46} no successful samples {extra}"
    p50, p95 = p50_p95(samples_ms)
    return f"{name:<46} n={len(samples_ms):<4} p50={p50:8.1f} ms  p95={p95:8.1f} ms  {extra}"


# --- the raw engine ---


async def raw_create_exec(docker: aiodocker.Docker) -> float:
    """Create and start a container of the default image, then run `true` in it (exec create, start, wait
    for its exit): the engine's own create → first exec. The container is removed afterwards (not timed)."""
    name = f"bench-raw-{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    container = await docker.containers.create(
        {"Image": RAW_IMAGE, "Cmd": ["sleep", "infinity"], "Labels": {"tidepool.bench": "raw"}}, name=name
    )
    try:
        await container.start()
        execution = await container.exec(["true"], stdout=True, stderr=True)
        async with execution.start(detach=False) as stream:
            while await stream.read_out() is not None:
                pass
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        await container.delete(force=True)
    return elapsed


async def raw_engine(docker_host: str) -> tuple[list[float], list[float]]:
    async with aiodocker.Docker(url=docker_host) as docker:
        await raw_create_exec(docker)  # warm the engine's caches
        sequential = [await raw_create_exec(docker) for _ in range(SEQUENTIAL)]
        concurrent = list(await asyncio.gather(*(raw_create_exec(docker) for _ in range(CONCURRENT))))
    return sequential, concurrent


# --- Tidepool ---


def warm_members(admin: Daytona, pool_id: str) -> set[str]:
    page = admin._sandbox_api.list_sandboxes(include_warm=True, limit=200)
    return {item.id for item in page.items if item.warm_pool_id == pool_id and item.state == "started"}


def wait_for_members(admin: Daytona, pool_id: str, size: int) -> set[str]:
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        members = warm_members(admin, pool_id)
        if len(members) >= size:
            return members
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool reached {len(members)} of {size} members")
        time.sleep(0.2)


# Wall-clock moments of each create (same machine as the stack): sent, answered, first exec done.
MOMENTS: dict[str, tuple[float, float, float]] = {}


async def create_exec(client: AsyncDaytona) -> tuple[str, float]:
    sent = time.time()
    started = time.perf_counter()
    sandbox = await client.create(timeout=120)
    answered = time.time()
    await sandbox.process.exec("true")
    MOMENTS[sandbox.id] = (sent, answered, time.time())
    return sandbox.id, (time.perf_counter() - started) * 1000


def breakdown(stack: StackThread, ids: list[str]) -> str:
    """Where cold creates spent their time, medians in ms, from each sandbox's own timeline: request sent →
    row written by the API (`createdAt`) → `started` reported by the runner (its event's `occurredAt`:
    scheduler, runner, engine and daemon start) → create answered (event applied, waiter woken) → first
    exec done (SDK → proxy → runner → daemon)."""
    names = ("api", "scheduler+runner+engine", "back to SDK", "exec")
    segments: dict[str, list[float]] = {name: [] for name in names}
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    for sandbox_id in ids:
        sent, answered, executed = MOMENTS[sandbox_id]
        row = httpx.get(f"{stack.api_url}/sandbox/{sandbox_id}", headers=headers).json()
        events = httpx.get(f"{stack.api_url}/sandbox/{sandbox_id}/events", headers=headers).json()
        started = [e for e in events if e.get("newState") == "started"]
        if not started:
            continue
        created = datetime.fromisoformat(row["createdAt"]).timestamp()
        reported = min(datetime.fromisoformat(e["occurredAt"]).timestamp() for e in started)
        for name, value in (
            ("api", created - sent),
            ("scheduler+runner+engine", reported - created),
            ("back to SDK", answered - reported),
            ("exec", executed - answered),
        ):
            segments[name].append(value * 1000)
    parts = [f"{name} {statistics.median(values):.0f}" for name, values in segments.items() if values]
    return "  where the time goes (p50 ms): " + ", ".join(parts)


async def concurrent_creates(
    config: DaytonaConfig, count: int, keep: list[str] | None = None
) -> tuple[list[str], list[float], int]:
    """`count` creates at once (asyncio.gather), each followed by its first exec; all deleted after (`keep`
    receives their ids before, for a breakdown)."""
    async with AsyncDaytona(config) as client:
        results = await asyncio.gather(*(create_exec(client) for _ in range(count)), return_exceptions=True)
        done = [result for result in results if isinstance(result, tuple)]
        failures = len(results) - len(done)
        if keep is not None:
            keep.extend(sandbox_id for sandbox_id, _ in done)
            return [sandbox_id for sandbox_id, _ in done], [ms for _, ms in done], failures
        for sandbox_id, _ in done:
            try:
                await client.delete(await client.get(sandbox_id), timeout=120)
            except Exception as error:  # still measured; the stack's stop removes what is left
                print(f"  (could not delete {sandbox_id}: {error})", flush=True)
    return [sandbox_id for sandbox_id, _ in done], [ms for _, ms in done], failures


async def sequential_claims(config: DaytonaConfig, admin: Daytona, pool_id: str) -> tuple[list[float], int]:
    """One create at a time, each waiting first for a started member: returns the times and the claims."""
    samples: list[float] = []
    claims = 0
    async with AsyncDaytona(config) as client:
        for _ in range(SEQUENTIAL):
            members = wait_for_members(admin, pool_id, 1)
            sandbox_id, elapsed = await create_exec(client)
            samples.append(elapsed)
            claims += sandbox_id in members
            await client.delete(await client.get(sandbox_id), timeout=120)
    return samples, claims


def bench_pool(daytona: Daytona, stack: StackThread) -> list[str]:
    config = DaytonaConfig(api_key=stack.api_key, api_url=stack.api_url)
    raw_sequential, raw_concurrent = asyncio.run(raw_engine(stack.docker_host))
    raw_p50 = p50_p95(raw_concurrent)[0]
    lines = [
        line("raw engine create+start+exec, one at a time", raw_sequential),
        line(f"raw engine, {CONCURRENT} at once", raw_concurrent),
    ]

    daytona.delete(daytona.create())  # first use of the image on this stack: not measured
    cold_ids: list[str] = []
    _, cold, cold_failures = asyncio.run(concurrent_creates(config, CONCURRENT, keep=cold_ids))
    cold_p50 = p50_p95(cold)[0] if cold else float("nan")
    lines.append(
        line(
            f"{CONCURRENT} concurrent cold creates -> exec",
            cold,
            f"ok={100 * len(cold) / CONCURRENT:.0f}%  vs raw p50 {cold_p50 / raw_p50:4.2f}x (target <= 1.3x)",
        )
    )
    lines.append(breakdown(stack, cold_ids))
    for sandbox_id in cold_ids:
        daytona.delete(daytona.get(sandbox_id), timeout=120)

    pool = daytona.warm_pool.create(SNAPSHOT, pool=2)
    try:
        wait_for_members(daytona, pool.id, 2)
        MOMENTS.clear()
        warm, claims = asyncio.run(sequential_claims(config, daytona, pool.id))
        lines.append(
            line(
                "warm-pool create -> first exec",
                warm,
                f"claims={claims}/{len(warm)}  (target p50 <= 30, p95 <= 80 ms)",
            )
        )
        answered = [(a - s) * 1000 for s, a, _ in MOMENTS.values()]
        executed = [(e - a) * 1000 for _, a, e in MOMENTS.values()]
        lines.append(
            f"  of which (p50 ms): create answered {statistics.median(answered):.0f}, "
            f"first exec {statistics.median(executed):.0f}"
        )

        daytona.warm_pool.update(pool.id, pool=BURST)
        members = wait_for_members(daytona, pool.id, BURST)
        ids, burst, _failures = asyncio.run(concurrent_creates(config, BURST))
        sized = "" if BURST >= 100 else f"  [sized down from 100 to {BURST}: {CORES} cores]"
        lines.append(
            line(
                f"{BURST} concurrent creates, pool of {BURST}",
                burst,
                f"ok={100 * len(burst) / BURST:.0f}%  claims={len(set(ids) & members)}/{BURST}  "
                f"(target p50 <= 300, p95 <= 600 ms){sized}",
            )
        )
    finally:
        daytona.warm_pool.delete(pool.id)
    if cold_failures:
        lines.append(f"  ({cold_failures} cold creates failed)")
    return lines
