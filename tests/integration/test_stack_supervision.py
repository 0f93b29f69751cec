"""`make up`'s own supervisor (issue #10, "Supervision on one machine"): a service that dies is restarted
with backoff and logged with its exit reason while the others keep serving; only Ctrl-C / SIGTERM stops it.

The stack here is the real CLI (`python -m tidepool_stack up`, what `make up` runs) on its embedded defaults
(SQLite, its own nats-server), driven with the official SDK.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaConfig

from tests.integration.stackthread import release_sandboxes
from tests.polling import wait_until
from tidepool_stack.supervisor import SYSTEM_CA_DIR, free_port, untrust

pytestmark = pytest.mark.integration

SERVICE_MODULES = {f"tidepool_{name}": name for name in ("api", "scheduler", "builder", "runner", "proxy")}


def children_of(pid: int) -> dict[str, int]:
    """{service or `nats`: pid} of the direct children of `pid`."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        words = [word.decode(errors="replace") for word in argv]
        for word in words:
            if word in SERVICE_MODULES:
                found[SERVICE_MODULES[word]] = int(entry.name)
        if words and words[0].endswith("nats-server"):
            found["nats"] = int(entry.name)
    return found


class UpProcess:
    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir, self.log_path = data_dir, log_path
        self.api_port, self.proxy_port = free_port(), free_port()
        env = {**os.environ, "TIDEPOOL_LOG_LEVEL": "INFO"}
        for name in (
            "TIDEPOOL_DATABASE_URL",
            "TIDEPOOL_NATS_URL",
            "TIDEPOOL_DOCKER_HOST",
            "TIDEPOOL_DATA_DIR",
        ):
            env.pop(name, None)  # embedded defaults, as `make up` on a fresh machine
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "tidepool_stack", "up", "--data-dir", str(data_dir),
                "--api-port", str(self.api_port), "--proxy-port", str(self.proxy_port),
            ],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"`tidepool up` exited with {self.process.returncode}:\n{self.output()[-5000:]}")
            return "Tidepool is up" in self.output()

        wait_until(up, timeout=1800, interval=1, message="`tidepool up` did not come up")

    def sdk(self) -> Daytona:
        env_lines = (self.data_dir / "env").read_text().splitlines()
        values = dict(line.removeprefix("export ").split("=", 1) for line in env_lines if "=" in line)
        return Daytona(DaytonaConfig(api_key=values["DAYTONA_API_KEY"], api_url=values["DAYTONA_API_URL"]))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=180)
        finally:
            self.log.close()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    trusted_before = set(SYSTEM_CA_DIR.glob("tidepool-object-storage-*.crt"))
    running = UpProcess(tmp_path / "tidepool", tmp_path / "up.log")
    try:
        running.wait_up()
        yield running
    finally:
        code = running.stop()
        release_sandboxes(running.data_dir)
        for added in set(SYSTEM_CA_DIR.glob("tidepool-object-storage-*.crt")) - trusted_before:
            untrust(added)
        assert code == 0, running.output()[-5000:]


def restarted(up: UpProcess, name: str, old_pid: int) -> int:
    """Waits for `name` to run again under a new pid; returns it."""

    def new_pid() -> int | None:
        pid = children_of(up.process.pid).get(name)
        return pid if pid and pid != old_pid and f"{name} restarted" in up.output() else None

    return wait_until(
        new_pid, timeout=120, message=lambda: f"{name} was not restarted:\n{up.output()[-4000:]}"
    )


def answers(sandbox: object, word: str) -> bool:
    """An exec succeeds (a restarted runner takes a moment to listen again: 502 until then)."""
    from daytona.common.errors import DaytonaError

    try:
        return sandbox.process.exec(f"echo {word}").result.strip() == word  # type: ignore[attr-defined]
    except DaytonaError:
        return False


def test_a_killed_service_is_restarted_while_the_others_keep_serving(up: UpProcess) -> None:
    daytona = up.sdk()
    before = children_of(up.process.pid)
    assert set(SERVICE_MODULES.values()) | {"nats"} <= set(before), before
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(language="python"), timeout=180)
    assert sandbox.process.exec("echo before").result.strip() == "before"

    # The runner crashes: it comes back, logged with why; the API was never interrupted.
    os.kill(before["runner"], signal.SIGKILL)
    restarted(up, "runner", before["runner"])
    assert "runner exited with signal SIGKILL; restarting" in up.output()
    assert children_of(up.process.pid)["api"] == before["api"]
    assert up.process.poll() is None
    wait_until(lambda: answers(sandbox, "after-runner"), timeout=60, interval=0.5)

    # The scheduler and the bus itself: the platform converges again and creates work.
    os.kill(before["scheduler"], signal.SIGKILL)
    os.kill(before["nats"], signal.SIGKILL)
    restarted(up, "scheduler", before["scheduler"])
    restarted(up, "nats", before["nats"])
    second = daytona.create(CreateSandboxFromSnapshotParams(language="python"), timeout=180)
    assert second.process.exec("echo second").result.strip() == "second"
    wait_until(lambda: answers(sandbox, "still"), timeout=60, interval=0.5)
    daytona.delete(second)
    daytona.delete(sandbox)
    after = children_of(up.process.pid)
    assert after["api"] == before["api"] and after["proxy"] == before["proxy"]


def test_sigterm_stops_everything(up: UpProcess) -> None:
    children = children_of(up.process.pid)
    assert children
    assert up.stop() == 0
    alive = [pid for pid in children.values() if Path(f"/proc/{pid}").exists()]
    assert alive == [], up.output()[-4000:]
