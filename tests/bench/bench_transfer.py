"""File transfer benchmark: 1 GiB up and down through the official SDK's streaming methods.

Prints throughput (MB = 10^6 bytes) against a target of ≥ 300 MB/s, and the peak RSS growth of the proxy,
the runner and the sandbox's daemon during each transfer against a target of ≤ 64 MiB (a relay that
buffered the file would grow by about 1 GiB). `ratio` follows bench_spine: cost / target, so ≤ 1.00 meets
the target (for throughput: target / measured).

Standalone: `python -m tests.bench.bench_transfer` starts its own stack. From another bench, call
`bench_transfer(daytona, stack)`.
"""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from daytona import Daytona, Sandbox

from tests.integration.stackthread import StackThread

MIB = 1024 * 1024
TRANSFER_BYTES = int(os.environ.get("BENCH_TRANSFER_MIB", "1024")) * MIB
TARGET_MB_PER_SECOND = 300.0
TARGET_RSS_GROWTH_MIB = 64.0
RSS_SAMPLE_SECONDS = 0.02
REMOTE_PATH = "bench-transfer.bin"


class PatternReader(io.RawIOBase):
    """`size` bytes of a repeated random 1 MiB block, produced on demand (the client never holds the file)."""

    def __init__(self, size: int, block: bytes) -> None:
        super().__init__()
        self._remaining = size
        self._block = block
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._remaining, len(self._block) - self._offset)
        if count <= 0:
            return 0
        buffer[:count] = self._block[self._offset : self._offset + count]
        self._offset = (self._offset + count) % len(self._block)
        self._remaining -= count
        return count


def expected_crc(size: int, block: bytes) -> int:
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(block[: size % len(block)], crc)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class RssWatch:
    """Samples the RSS of some processes in a thread; `growth_mib` is peak minus the value at start."""

    pids: dict[str, int]
    baseline: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            try:
                value = rss_kib(pid)
            except OSError:
                continue
            self.peak[name] = max(self.peak.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._sample()

    @contextmanager
    def running(self) -> Iterator[RssWatch]:
        self.baseline = {name: rss_kib(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.baseline)
        thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._sample()

    def growth_mib(self, name: str) -> float:
        return (self.peak[name] - self.baseline[name]) / 1024


def daemon_pid(sandbox: Sandbox) -> int:
    """The sandbox's toolbox daemon worker as seen from the host: the child of the daemon's supervisor,
    which is the child of the container's init process (see tidepool_daemon/supervisor.py)."""
    init_pid = subprocess.run(
        ["podman", "inspect", "--format", "{{.State.Pid}}", f"tidepool-{sandbox.id}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    supervisors = subprocess.run(
        ["pgrep", "-P", init_pid, "-f", "python3 -I /opt/tidepool/daemon/main.py"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if len(supervisors) != 1:
        raise RuntimeError(f"expected one daemon supervisor under container init {init_pid}: {supervisors}")
    found = subprocess.run(
        ["pgrep", "-P", supervisors[0], "-x", "tidepool-worker"], capture_output=True, text=True, check=False
    ).stdout.split()
    if len(found) != 1:
        raise RuntimeError(f"expected one daemon worker under supervisor {supervisors[0]}, found {found}")
    return int(found[0])


def service_pids(stack: StackThread | None) -> dict[str, int]:
    if stack is not None:
        return {name: stack.stack.children[name].process.pid for name in ("proxy", "runner")}
    pids: dict[str, int] = {}
    for name in ("proxy", "runner"):
        found = subprocess.run(
            ["pgrep", "-n", "-f", f"-m tidepool_{name}"], capture_output=True, text=True, check=False
        ).stdout.split()
        if found:
            pids[name] = int(found[0])
    return pids


def throughput_line(name: str, seconds: float) -> str:
    mb_per_second = TRANSFER_BYTES / 1e6 / seconds
    return (
        f"{name:<32} {TRANSFER_BYTES // MIB} MiB in {seconds:6.2f} s = {mb_per_second:7.1f} MB/s  "
        f"target>={TARGET_MB_PER_SECOND:.0f} MB/s  ratio={TARGET_MB_PER_SECOND / mb_per_second:5.2f}x"
    )


def rss_line(name: str, watch: RssWatch) -> str:
    parts = []
    worst = 0.0
    for process in watch.pids:
        growth = watch.growth_mib(process)
        worst = max(worst, growth)
        parts.append(f"{process}={growth:+6.1f}")
    return (
        f"{name:<32} peak RSS growth MiB: {'  '.join(parts)}  target<={TARGET_RSS_GROWTH_MIB:.0f} MiB  "
        f"ratio={worst / TARGET_RSS_GROWTH_MIB:5.2f}x"
    )


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench_transfer(daytona: Daytona, stack: StackThread | None = None) -> list[str]:
    block = os.urandom(MIB)
    want_crc = expected_crc(TRANSFER_BYTES, block)
    sandbox = daytona.create()
    try:
        pids = {**service_pids(stack), "daemon": daemon_pid(sandbox)}
        sandbox.fs.upload_file(b"warm-up", "warm.txt")  # warm pools and connections
        sandbox.fs.download_file("warm.txt")

        with RssWatch(pids).running() as upload_watch:
            upload_seconds = timed(
                lambda: sandbox.fs.upload_file_stream(PatternReader(TRANSFER_BYTES, block), REMOTE_PATH)
            )
        size = sandbox.fs.get_file_info(REMOTE_PATH).size
        if size != TRANSFER_BYTES:
            raise RuntimeError(f"uploaded {size} bytes, expected {TRANSFER_BYTES}")
        # Let the upload's dirty pages reach the disk first, so the download is not timed against that
        # writeback (untimed).
        sandbox.process.exec("sync")

        received = 0
        crc = 0

        def download() -> None:
            nonlocal received, crc
            for chunk in sandbox.fs.download_file_stream(REMOTE_PATH):
                received += len(chunk)
                crc = zlib.crc32(chunk, crc)

        with RssWatch(pids).running() as download_watch:
            download_seconds = timed(download)
        if received != TRANSFER_BYTES or crc != want_crc:
            raise RuntimeError(f"downloaded {received} bytes (crc match: {crc == want_crc})")
    finally:
        daytona.delete(sandbox)
    return [
        throughput_line("upload_file_stream", upload_seconds),
        rss_line("  during upload", upload_watch),
        throughput_line("download_file_stream", download_seconds),
        rss_line("  during download", download_watch),
    ]


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack([("transfer", bench_transfer)])


if __name__ == "__main__":
    main()
