"""Policies of tests/conftest.py, checked on inner pytest sessions (issue #18): when the tests' own
nats-server dies the session stops at once, instead of every test waiting on it until pytest's 600 s
timeout; a skipped test fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Kills the session's nats-server (found by its port), then waits on it the way a test stuck on the bus
# would: with no deadline of its own.
INNER_TEST = """
import os, socket
from pathlib import Path


def test_waits_on_a_dead_server(nats_url):
    port = nats_url.rsplit(":", 1)[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\\0")
            except OSError:
                continue
            if cmdline[0].endswith(b"nats-server") and port.encode() in cmdline:
                os.kill(int(entry), 9)
    server, _ = socket.socketpair()
    server.recv(1)  # blocks until the session is interrupted
"""


def run_inner(tmp_path: Path, source: str) -> tuple[int, str]:
    """Run `source` as a test file in a pytest session that loads tests/conftest.py."""
    (tmp_path / "test_inner.py").write_text(source)
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", tmp_path]
    # The timeout is far above what a session here takes and far below the 600 s a hung one would wait.
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_a_dead_nats_server_stops_the_session(tmp_path: Path) -> None:
    returncode, output = run_inner(tmp_path, INNER_TEST)
    assert returncode != 0, output
    assert "nats-server (pid" in output and "died with status -9: stopping the tests" in output, output
    assert "KeyboardInterrupt" in output, output


def test_a_skip_is_a_failure(tmp_path: Path) -> None:
    source = """
import pytest

def test_needs_a_tool():
    pytest.skip("the tool is not installed")

@pytest.mark.skipif(True, reason="no podman")
def test_marked():
    pass

def test_fine():
    pass
"""
    returncode, output = run_inner(tmp_path, source)
    assert returncode == 1, output
    assert "1 failed, 1 passed, 1 error" in output, output  # a skip at setup (a mark, a fixture) errors
    assert "this suite does not skip: Skipped: the tool is not installed" in output, output
    assert "this suite does not skip: Skipped: no podman" in output, output
