"""Issue #16: the CLI's stored login (0600, env wins), its usage errors and exit codes, without a stack."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tidepool_cli import config
from tidepool_cli.account_commands import PERMISSIONS, expiry
from tidepool_cli.output import EXIT_CODES_HELP, ExitCode, exit_code
from tidepool_contracts.permissions import Permission
from tidepool_stack.cli import app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("DAYTONA_API_URL", raising=False)
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    return tmp_path


def test_login_writes_0600_and_the_environment_wins(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(app, ["login", "--api-url", "http://api.example/api/", "--api-key", "k1"])
    assert result.exit_code == 0, result.output
    path = home / "tidepool" / "config.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {"api_url": "http://api.example/api", "api_key": "k1"}
    assert config.load() == config.Credentials("http://api.example/api", "k1")

    monkeypatch.setenv("DAYTONA_API_KEY", "from-env")
    monkeypatch.setenv("DAYTONA_API_URL", "http://other/api")
    assert config.load() == config.Credentials("http://other/api", "from-env")

    assert CliRunner().invoke(app, ["logout"]).exit_code == 0
    assert not path.exists()


@pytest.mark.parametrize("arguments", [["sandbox", "list"], ["api-key", "list"], ["ssh", "sb", "--print"]])
def test_no_key_exits_4_not_authenticated(home: Path, arguments: list[str]) -> None:
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == ExitCode.UNAUTHENTICATED == 4
    assert "tidepool login" in result.output


@pytest.mark.parametrize("arguments", [["sandbox", "list"], ["organization", "list"]])
def test_an_api_that_does_not_answer_exits_9(
    home: Path, monkeypatch: pytest.MonkeyPatch, arguments: list[str]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("DAYTONA_API_URL", f"http://127.0.0.1:{port}/api")
    monkeypatch.setenv("DAYTONA_API_KEY", "some-key")
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == ExitCode.UNAVAILABLE == 9, result.output
    assert "error" in result.output


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, 3), (401, 4), (403, 5), (409, 6), (400, 6), (429, 7), (503, 9), (500, 1)],
)
def test_api_statuses_map_to_documented_exit_codes(status: int, code: int) -> None:
    from daytona import DaytonaError

    assert exit_code(DaytonaError("no", status_code=status)) == code
    assert f"{code} " in EXIT_CODES_HELP


def test_the_cli_knows_every_api_key_scope() -> None:
    assert set(PERMISSIONS) == {permission.value for permission in Permission}


def test_expiry_accepts_durations_and_iso_times() -> None:
    soon = expiry("90m") - datetime.now(UTC)
    assert timedelta(minutes=89) < soon <= timedelta(minutes=90)
    assert expiry("2030-01-02T03:04:05") == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert expiry("2030-01-02T03:04:05+02:00").utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    "arguments",
    [
        ["sandbox", "create", "--cpu", "2"],
        ["sandbox", "create", "--label", "novalue"],
        ["sandbox", "create", "--snapshot", "s", "--image", "i"],
        ["preview-url", "sb"],
        ["snapshot", "create", "name"],
        ["api-key", "create", "k", "--permissions", "no:such"],
        ["api-key", "create", "k", "--expires", "tomorrow"],
        ["api-key", "create", "k", "--read-only", "-p", "write:volumes"],
        ["mcp", "init", "emacs"],
        ["sandbox", "create", "--volume", "novolume"],
        ["sandbox", "create", "--volume", "v:relative/path"],
    ],
)
def test_usage_errors_exit_2(home: Path, arguments: list[str]) -> None:
    assert CliRunner().invoke(app, arguments).exit_code == 2


def test_operator_commands_are_still_there() -> None:
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert {"up", "down", "status", "login", "exec", "ssh", "preview-url"} <= names
    groups = {group.name for group in app.registered_groups}
    assert {"sandbox", "snapshot", "volume", "api-key", "organization", "mcp"} <= groups
