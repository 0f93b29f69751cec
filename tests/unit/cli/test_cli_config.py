"""Issue #16: the CLI's stored login (0600, env wins) and its usage errors, without a stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tidepool_cli import config
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


def test_no_key_is_an_error_with_status_1(home: Path) -> None:
    result = CliRunner().invoke(app, ["sandbox", "list"])
    assert result.exit_code == 1
    assert "tidepool login" in result.output


@pytest.mark.parametrize(
    "arguments",
    [
        ["sandbox", "create", "--cpu", "2"],
        ["sandbox", "create", "--label", "novalue"],
        ["sandbox", "create", "--snapshot", "s", "--image", "i"],
        ["preview-url", "sb"],
        ["snapshot", "create", "name"],
    ],
)
def test_usage_errors_exit_2(home: Path, arguments: list[str]) -> None:
    assert CliRunner().invoke(app, arguments).exit_code == 2


def test_operator_commands_are_still_there() -> None:
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert {"up", "down", "login", "exec", "preview-url", "mcp"} <= names
