"""The tests' own nats-server: when it dies, the test session stops at once instead of every test waiting
on it until pytest's 600 s timeout (issue #18)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Kills the session's nats-server (found by its port), then waits on it the way a test stuck on the bus
# would: with no deadline of its own.
INNER_TEST = '''
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
'''


def test_a_dead_nats_server_stops_the_session(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", tmp_path]
    # The timeout is far above what the stop takes and far below the 600 s a hung session would wait.
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "nats-server (pid" in output and "died with status -9: stopping the tests" in output, output
    assert "KeyboardInterrupt" in output, output
