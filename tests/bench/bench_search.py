"""What bounding user-controlled work costs (issue #7 item 8), through the official SDK: find, search and
replace run in a bounded child process of the daemon, small listings in the daemon itself, large ones in a
child too. Figures: medians and p95 in milliseconds, and one listing of a 100k-entry folder (a default
sandbox's 3 GiB disk has about 196k inodes).

`bench_search(daytona)` returns the lines to print; `main()` runs it against a stack this script starts.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from daytona import Daytona

ROUNDS = int(os.environ.get("BENCH_SEARCH_ROUNDS", "50"))
BIG_FOLDER_ENTRIES = int(os.environ.get("BENCH_BIG_FOLDER_ENTRIES", "100000"))


def summary(name: str, samples_ms: list[float]) -> str:
    ordered = sorted(samples_ms)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"{name:<40} n={len(ordered):<4} median={statistics.median(ordered):8.2f} ms  p95={p95:8.2f} ms"


def timed(call: Callable[[], object], rounds: int = ROUNDS) -> list[float]:
    samples: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def bench_search(daytona: Daytona) -> list[str]:
    sandbox = daytona.create()
    try:
        fs = sandbox.fs
        # A small project: 200 files of 100 lines in 10 folders; and a folder past the in-daemon listing.
        made = sandbox.process.exec(
            "mkdir -p bench/src && cd bench/src && for d in $(seq 10); do mkdir d$d; "
            "for f in $(seq 20); do seq 100 | sed 's/$/ needle line/' > d$d/f$f.txt; done; done && "
            "mkdir -p ../mid && cd ../mid && seq 20000 | xargs touch && "
            f"mkdir -p ../big && cd ../big && seq {BIG_FOLDER_ENTRIES} | xargs touch",
            timeout=600,
        )
        if made.exit_code != 0:
            raise RuntimeError(f"could not make the bench tree: {made.result}")
        lines = [
            summary("list_files(10 entries, in the daemon)", timed(lambda: fs.list_files("bench/src"))),
            summary("list_files(20k entries, bounded child)", timed(lambda: fs.list_files("bench/mid"), 10)),
            summary(
                "find_files(200 files, 20k matches)", timed(lambda: fs.find_files("bench/src", "needle"), 20)
            ),
            summary("find_files(200 files, no match)", timed(lambda: fs.find_files("bench/src", "absent"))),
            summary(
                "search_files(glob over 210 entries)", timed(lambda: fs.search_files("bench/src", "f1*.txt"))
            ),
            summary(
                "replace_in_files(1 file, no match)",
                timed(lambda: fs.replace_in_files(["bench/src/d1/f1.txt"], "absent", "x")),
            ),
        ]
        started = time.perf_counter()
        entries = fs.list_files("bench/big")
        seconds = time.perf_counter() - started
        lines.append(f"{'list_files(' + str(len(entries)) + ' entries)':<40} {seconds * 1000:8.0f} ms once")
    finally:
        daytona.delete(sandbox)
    return lines


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack([("search", lambda daytona, _stack: bench_search(daytona))])


if __name__ == "__main__":
    main()
