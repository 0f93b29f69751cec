"""Containment (issue #7): a neighbour's `exec("true")` while another tenant's sandbox runs a fork bomb, a
memory hog and a disk filler, as a ratio to the same neighbour when all is quiet (target: at most 2x)."""

from __future__ import annotations

import os
import statistics
import time

from daytona import Daytona, SessionExecuteRequest

SAMPLES = int(os.environ.get("BENCH_ISOLATION_EXECS", "100"))
NOISE_SECONDS = 120
RAMP_UP_SECONDS = 5.0
NOISE = (
    "bomb() { bomb | bomb & }; bomb",
    "python3 -c 'b=[]\nwhile True: b.append(b\"x\" * (64 << 20))'",
    "dd if=/dev/zero of=/tmp/fill bs=4M",
)


def exec_latencies_ms(sandbox: object, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        sandbox.process.exec("true")  # type: ignore[attr-defined]
        samples.append((time.perf_counter() - began) * 1000)
    return samples


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def bench_isolation(daytona: Daytona) -> list[str]:
    neighbour = daytona.create()
    noisy = daytona.create()
    try:
        exec_latencies_ms(neighbour, 10)  # warm
        quiet = exec_latencies_ms(neighbour, SAMPLES)
        noisy.process.create_session("noise")
        for command in NOISE:
            quoted = "'" + command.replace("'", "'\"'\"'") + "'"
            noisy.process.execute_session_command(
                "noise",
                SessionExecuteRequest(command=f"timeout {NOISE_SECONDS} sh -c {quoted}", run_async=True),
            )
        time.sleep(RAMP_UP_SECONDS)  # a bench, not a test: let the bomb, the hog and the filler get going
        loud = exec_latencies_ms(neighbour, SAMPLES)
    finally:
        daytona.delete(noisy)
        daytona.delete(neighbour)
    quiet_median, loud_median = statistics.median(quiet), statistics.median(loud)
    return [
        f"{'neighbour exec, quiet':<32} n={len(quiet):<4} median={quiet_median:8.1f} ms  "
        f"p95={p95(quiet):8.1f} ms",
        f"{'neighbour exec, bomb+hog+filler':<32} n={len(loud):<4} median={loud_median:8.1f} ms  "
        f"p95={p95(loud):8.1f} ms  ratio={loud_median / quiet_median:5.2f}x (target <= 2x)",
    ]
