"""Issue #16: the installed `tidepool` command against a live stack, as a user's shell runs it.

Every call is a real subprocess of `.venv/bin/tidepool` with DAYTONA_API_URL / DAYTONA_API_KEY in its
environment (the `sdk_env` fixture); `--format json` output is parsed; the official SDK checks what the
CLI said."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from daytona import Daytona, DaytonaNotFoundError

from tests.integration.images_fixture import ensure_python_slim_stand_in

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

TIDEPOOL = str(Path(sys.executable).parent / "tidepool")


def tidepool(*args: str, config_home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if config_home is not None:
        env["XDG_CONFIG_HOME"] = str(config_home)
    return subprocess.run([TIDEPOOL, *args], capture_output=True, text=True, env=env, timeout=300)


def test_sandbox_lifecycle_exec_and_preview_url() -> None:
    created = tidepool("sandbox", "create", "--label", "suite=cli", "--env", "GREETING=hello", "-f", "json")
    assert created.returncode == 0, created.stderr
    sandbox = json.loads(created.stdout)
    assert sandbox["state"] == "started"
    assert sandbox["labels"]["suite"] == "cli"
    try:
        listed = tidepool("sandbox", "list", "--label", "suite=cli", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        assert [row["id"] for row in json.loads(listed.stdout)] == [sandbox["id"]]

        table = tidepool("sandbox", "list")
        assert table.returncode == 0 and sandbox["id"] in table.stdout

        info = json.loads(tidepool("sandbox", "info", sandbox["id"], "-f", "json").stdout)
        assert info["id"] == sandbox["id"]

        echoed = tidepool("exec", sandbox["id"], "--", "sh", "-c", 'echo "$GREETING world"; exit 3')
        assert echoed.returncode == 3
        assert echoed.stdout.strip() == "hello world"
        assert tidepool("exec", sandbox["id"], "--", "true").returncode == 0

        url = tidepool("preview-url", sandbox["id"], "--port", "3000")
        assert url.returncode == 0, url.stderr
        assert url.stdout.strip().startswith("http") and sandbox["id"] in url.stdout
        signed = json.loads(
            tidepool("preview-url", sandbox["id"], "-p", "3000", "--expires", "120", "-f", "json").stdout
        )
        assert signed["url"].startswith("http") and signed["token"]

        stopped = tidepool("sandbox", "stop", sandbox["id"])
        assert stopped.returncode == 0, stopped.stderr
        assert Daytona().get(sandbox["id"]).state.value == "stopped"
    finally:
        deleted = tidepool("sandbox", "delete", sandbox["id"])
    assert deleted.returncode == 0, deleted.stderr
    try:
        state = Daytona().get(sandbox["id"]).state.value
    except DaytonaNotFoundError:
        state = "gone"
    assert state in ("gone", "destroyed", "destroying")


def test_bad_sandbox_exits_1_with_a_message_on_stderr() -> None:
    result = tidepool("sandbox", "info", "no-such-sandbox")
    assert result.returncode == 1
    assert "error" in result.stderr.lower() and result.stdout == ""
    assert tidepool("exec", "no-such-sandbox", "--", "true").returncode == 1


def test_usage_error_exits_2() -> None:
    assert tidepool("sandbox", "create", "--cpu", "2").returncode == 2
    assert tidepool("sandbox", "create", "--env", "NOEQUALS").returncode == 2


def test_login_stores_credentials_0600_and_env_wins(tmp_path: Path) -> None:
    url, key = os.environ["DAYTONA_API_URL"], os.environ["DAYTONA_API_KEY"]
    login = tidepool("login", "--api-url", url, "--api-key", key, config_home=tmp_path)
    assert login.returncode == 0, login.stderr
    stored = tmp_path / "tidepool" / "config.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert json.loads(stored.read_text()) == {"api_url": url, "api_key": key}

    env = {name: value for name, value in os.environ.items() if not name.startswith("DAYTONA_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    from_file = subprocess.run(
        [TIDEPOOL, "sandbox", "list", "-f", "json"], capture_output=True, text=True, env=env
    )
    assert from_file.returncode == 0, from_file.stderr
    assert isinstance(json.loads(from_file.stdout), list)

    env["DAYTONA_API_KEY"] = "wrong-key"  # the environment wins over the stored key
    wrong = subprocess.run([TIDEPOOL, "sandbox", "list"], capture_output=True, text=True, env=env)
    assert wrong.returncode == 1 and wrong.stderr


def test_volume_create_list_delete() -> None:
    created = tidepool("volume", "create", "cli-volume", "-f", "json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["name"] == "cli-volume"
    listed = json.loads(tidepool("volume", "list", "-f", "json").stdout)
    assert "cli-volume" in [row["name"] for row in listed]
    deleted = tidepool("volume", "delete", "cli-volume")
    assert deleted.returncode == 0, deleted.stderr


def test_snapshot_build_streams_its_log_then_list_and_delete(tmp_path: Path) -> None:
    base = ensure_python_slim_stand_in()
    name = f"cli-snap-{uuid.uuid4().hex[:8]}"
    marker = f"building-{name}"  # unique: a real build, not a cache hit
    dockerfile = tmp_path / "Dockerfile"
    # The SDK streams logs only while it sees the snapshot building (it polls every second): build a while.
    dockerfile.write_text(f"FROM {base}\nRUN sleep 4 && echo {marker}\n")
    built = tidepool("snapshot", "create", name, "--dockerfile", str(dockerfile), "-f", "json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["state"] == "active"
    assert marker in built.stderr, "the build log is streamed to stderr"
    listed = json.loads(tidepool("snapshot", "list", "-f", "json").stdout)
    assert name in [row["name"] for row in listed]
    deleted = tidepool("snapshot", "delete", name)
    assert deleted.returncode == 0, deleted.stderr
