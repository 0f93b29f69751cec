"""Fixtures that run the real toolbox daemon as a subprocess on a unix socket.

The daemon is started exactly as the runner starts it in a sandbox (`python3 -I main.py --socket ...`),
using the system interpreter rather than the venv so a stray third-party import would fail here too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.polling import wait_until

REPO_ROOT = Path(__file__).resolve().parents[3]
DAEMON_ENTRY = REPO_ROOT / "services" / "daemon" / "main.py"
DAEMON_START_TIMEOUT_SECONDS = 10.0
# Marker placed in the daemon's environment to check that user commands inherit it.
CONTAINER_ENV_MARKER = ("TIDEPOOL_TEST_CONTAINER_ENV", "from-container")


def _system_python() -> str:
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and os.path.exists(candidate):
            return candidate
    return sys.executable


@pytest.fixture
def container_env_marker() -> tuple[str, str]:
    return CONTAINER_ENV_MARKER


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


@contextlib.contextmanager
def running_daemon(
    socket_path: Path,
    work_dir: Path,
    home_dir: Path,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    command_prefix: list[str] | None = None,
) -> Iterator[Path]:
    """Run the daemon the way the runner does and stop it (SIGTERM) afterwards. `extra_env` joins the
    daemon's environment (in a sandbox: the container's), e.g. to tighten its bounds; `command_prefix`
    runs it under a wrapper (e.g. `setpriv` to drop capabilities)."""
    env = {
        **os.environ,
        CONTAINER_ENV_MARKER[0]: CONTAINER_ENV_MARKER[1],
        "HOME": str(home_dir),
        **(extra_env or {}),
    }
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                *(command_prefix or []),
                _system_python(),
                "-I",
                str(DAEMON_ENTRY),
                "--socket",
                str(socket_path),
                "--log-level",
                "DEBUG",
            ],
            cwd=work_dir,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_socket(process, socket_path, log_path)
        yield socket_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~108 bytes and pytest's tmp_path can be longer; use a short dir.
    directory = Path(tempfile.mkdtemp(prefix="tpd-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def launch_daemon(tmp_path: Path, work_dir: Path) -> Callable[..., contextlib.AbstractContextManager[Path]]:
    """Factory for tests that need to control how the daemon starts (e.g. over a stale socket, or with
    `extra_env`)."""

    def launch(
        socket_path: Path, extra_env: dict[str, str] | None = None, command_prefix: list[str] | None = None
    ) -> contextlib.AbstractContextManager[Path]:
        home, log = tmp_path / "home", tmp_path / "daemon.log"
        return running_daemon(socket_path, work_dir, home, log, extra_env, command_prefix)

    return launch


@pytest.fixture
def daemon_socket(
    socket_dir: Path, launch_daemon: Callable[..., contextlib.AbstractContextManager[Path]]
) -> Iterator[Path]:
    with launch_daemon(socket_dir / "toolbox.sock") as socket_path:
        yield socket_path


@pytest.fixture
def daemon_client(daemon_socket: Path) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(daemon_socket))
    with httpx.Client(transport=transport, base_url="http://daemon", timeout=30.0) as client:
        yield client


def daemon_pids(socket_path: Path) -> tuple[int, int]:
    """(supervisor, serving worker) of the daemon listening on `socket_path` (see supervisor.py): both
    carry `--socket PATH` (the worker is a fork), only the worker is named `tidepool-worker`."""
    supervisor = worker = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            name = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if b"--socket" not in cmdline or str(socket_path).encode() not in cmdline:
            continue
        if name == "tidepool-worker":
            assert not worker, "two workers serve one socket"
            worker = int(entry)
        else:
            supervisor = int(entry)
    assert supervisor and worker, f"daemon processes not found: supervisor {supervisor}, worker {worker}"
    return supervisor, worker


def _wait_for_socket(process: subprocess.Popen[bytes], socket_path: Path, log_path: Path) -> None:
    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited early ({process.returncode}):\n{log_path.read_text()}")
        if not socket_path.exists():
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path))) as probe:
                return probe.get("http://daemon/version").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(
        answers,
        lambda: f"daemon socket {socket_path} did not come up:\n{log_path.read_text()}",
        timeout=DAEMON_START_TIMEOUT_SECONDS,
    )
