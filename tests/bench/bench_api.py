"""API edge figures: `POST /api/sandbox` timed as one HTTP request (auth, validation, the create itself).

Two figures, both the median (p50) and p95 of BENCH_API_CREATES requests (default 50) on one keep-alive
connection with the stack's API key:
- `API create (200, started)`: `{}` as the SDK sends it; the answer comes once the sandbox has started, so
  this includes the runner. Each sandbox is deleted after its request (not timed).
- `API create refused (400)`: a body with a bad `cpu`: auth and validation only, nothing is created.

With BENCH_API_BASELINE=<commit> (default f1f1fda; empty skips it), the same requests are sent, in the
same run and in alternating rounds, to a second stack started from that commit's services (a `git
archive` of it on PYTHONPATH, which the stack's services inherit), and the ratio to it is printed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.integration.stackthread import StackThread

CREATES = int(os.environ.get("BENCH_API_CREATES", "50"))
REFUSED_BODY = {"cpu": 0}  # refused by the baseline too (its resource check)
# Before issue #9's edge work (validated models, size limits, documented answers); "" skips the baseline.
DEFAULT_BASELINE = "f1f1fda"
ROUNDS = 5
CREATED = "API create (200, started)"
REFUSED = "API create refused (400)"
REPO = Path(__file__).resolve().parents[2]


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return statistics.median(ordered), ordered[max(0, round(0.95 * len(ordered)) - 1)]


def new_samples() -> dict[str, list[float]]:
    return {CREATED: [], REFUSED: []}


def measure(api_url: str, key: str, count: int, samples: dict[str, list[float]]) -> None:
    """Add `count` timings (ms) of each kind of create request to `samples`."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=120) as client:
        warm = client.post("/sandbox", json={})  # a new connection, a first query: not timed
        warm.raise_for_status()
        client.delete(f"/sandbox/{warm.json()['id']}")
        for _ in range(count):
            started = time.perf_counter()
            answer = client.post("/sandbox", json={})
            samples[CREATED].append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
            client.delete(f"/sandbox/{answer.json()['id']}").raise_for_status()
        for _ in range(count):
            started = time.perf_counter()
            answer = client.post("/sandbox", json=REFUSED_BODY)
            samples[REFUSED].append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 400, answer.text


@contextmanager
def baseline_stack(commit: str) -> Iterator[StackThread]:
    """A stack whose services run `commit`'s code: its packages first on PYTHONPATH."""
    source = Path(tempfile.mkdtemp(prefix=f"tidepool-baseline-{commit}-"))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True
    ).stdout
    tar_path = source / "source.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(source, filter="data")
    roots = [source / "contracts", source / "runtime", source / "stack"]
    roots += sorted(path for path in (source / "services").iterdir() if path.is_dir())
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(str(root) for root in roots)
    stack = StackThread(Path(tempfile.mkdtemp(prefix="tidepool-bench-baseline-")))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def bench_api(stack: StackThread) -> list[str]:
    baseline_commit = os.environ.get("BENCH_API_BASELINE", DEFAULT_BASELINE)
    figures, baseline = new_samples(), new_samples()
    if not baseline_commit:
        measure(stack.api_url, stack.api_key, CREATES, figures)
    else:
        # Both stacks up at once, measured in alternating rounds: drift of the machine hits both alike.
        with baseline_stack(baseline_commit) as old:
            for _ in range(ROUNDS):
                measure(stack.api_url, stack.api_key, CREATES // ROUNDS, figures)
                measure(old.api_url, old.api_key, CREATES // ROUNDS, baseline)
    lines = []
    for name, samples in figures.items():
        p50, p95 = percentiles(samples)
        line = f"{name:<32} n={len(samples):<4} median={p50:8.1f} ms  p95={p95:8.1f} ms"
        if baseline[name]:
            old_p50, old_p95 = percentiles(baseline[name])
            line += f"  {baseline_commit}: median={old_p50:.1f} ms p95={old_p95:.1f} ms"
            line += f"  ratio={p50 / old_p50:4.2f}x"
        lines.append(line)
    return lines
