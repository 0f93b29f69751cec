"""Issue #16: the installed `tidepool` command against a live stack, as a user's shell runs it.

Every call is a real subprocess of `.venv/bin/tidepool` with DAYTONA_API_URL / DAYTONA_API_KEY in its
environment (the `sdk_env` fixture); `--format json` output is parsed; the official SDK checks what the
CLI said."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from daytona import Daytona, DaytonaNotFoundError
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

TIDEPOOL = str(Path(sys.executable).parent / "tidepool")
# The CLI's exit codes (tidepool_cli.output.ExitCode), spelled out: the test checks the documented numbers.
NOT_FOUND, UNAUTHENTICATED, FORBIDDEN, CONFLICT, UNAVAILABLE = 3, 4, 5, 6, 9
SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "LogLevel=ERROR",
]  # fmt: skip


def tidepool(
    *args: str, config_home: Path | None = None, key: str | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if config_home is not None:
        env["XDG_CONFIG_HOME"] = str(config_home)
    if key is not None:
        env["DAYTONA_API_KEY"] = key
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run(
        [TIDEPOOL, *args], capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL
    )


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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


def test_bad_sandbox_exits_3_not_found_with_a_message_on_stderr() -> None:
    result = tidepool("sandbox", "info", "no-such-sandbox")
    assert result.returncode == NOT_FOUND
    assert "error" in result.stderr.lower() and "no-such-sandbox" in result.stderr and result.stdout == ""
    assert tidepool("exec", "no-such-sandbox", "--", "true").returncode == NOT_FOUND
    assert tidepool("ssh", "no-such-sandbox", "--print").returncode == NOT_FOUND


def test_exit_codes_are_documented_in_help() -> None:
    shown = tidepool("--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "3 not found" in text and "4 not authenticated" in text and "5 forbidden" in text


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
    assert wrong.returncode == UNAUTHENTICATED and "error" in wrong.stderr

    env.pop("DAYTONA_API_KEY")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "nobody")  # no login at all
    anonymous = subprocess.run([TIDEPOOL, "api-key", "list"], capture_output=True, text=True, env=env)
    assert anonymous.returncode == UNAUTHENTICATED and "tidepool login" in anonymous.stderr


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


def test_ssh_runs_openssh_through_the_gateway() -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        ran = tidepool("ssh", sandbox.id, "--expires", "30", "--", *SSH_OPTIONS, "echo hi; exit 3")
        assert ran.returncode == 3, ran.stderr
        assert ran.stdout.strip() == "hi"
        assert tidepool("ssh", sandbox.name, "--", *SSH_OPTIONS, "whoami").stdout.strip() == "daytona"

        printed = tidepool("ssh", sandbox.id, "--print")
        assert printed.returncode == 0, printed.stderr
        argv = shlex.split(printed.stdout)
        assert argv[0] == "ssh" and argv[-1].endswith("@localhost")
        token = argv[-1].split("@")[0]
        assert sandbox.validate_ssh_access(token).valid  # --print made a live token, and ran nothing
        by_hand = subprocess.run(
            [*argv, *SSH_OPTIONS, "echo from-printed"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert by_hand.returncode == 0, by_hand.stderr
        assert by_hand.stdout.strip() == "from-printed"
    finally:
        daytona.delete(sandbox)


def test_api_key_create_list_delete_and_its_scopes() -> None:
    name = f"cli-key-{uuid.uuid4().hex[:6]}"
    created = json_of(
        tidepool(
            "api-key", "create", name, "--permissions", "write:volumes,read:volumes", "--expires", "1h",
            "-f", "json",
        )
    )  # fmt: skip
    key = created["value"]
    assert created["name"] == name and sorted(created["permissions"]) == ["read:volumes", "write:volumes"]
    assert created["expires_at"] and key and not key.endswith("…")

    listed = {row["name"]: row for row in json_of(tidepool("api-key", "list", "-f", "json"))}
    assert name in listed and listed[name]["value"].endswith("…"), "a listed key's value stays masked"
    assert key not in tidepool("api-key", "list").stdout

    volume = f"cli-scoped-{uuid.uuid4().hex[:6]}"
    made = tidepool("volume", "create", volume, "-f", "json", key=key)
    assert made.returncode == 0, made.stderr
    try:
        refused = tidepool("sandbox", "create", "-f", "json", key=key)
        assert refused.returncode == FORBIDDEN and "write:sandboxes" in refused.stderr
        assert refused.stdout == ""
        assert tidepool("volume", "delete", volume, key=key).returncode == FORBIDDEN
        broader = tidepool("api-key", "create", f"{name}-wider", "-p", "write:sandboxes", key=key)
        assert broader.returncode == FORBIDDEN and "error" in broader.stderr
    finally:
        assert tidepool("volume", "delete", volume).returncode == 0

    deleted = tidepool("api-key", "delete", name)
    assert deleted.returncode == 0, deleted.stderr
    assert name not in [row["name"] for row in json_of(tidepool("api-key", "list", "-f", "json"))]
    assert tidepool("volume", "list", key=key).returncode == UNAUTHENTICATED
    assert tidepool("api-key", "delete", name).returncode == NOT_FOUND


def test_api_key_table_shows_the_value_once_and_bad_input_is_refused() -> None:
    name = f"cli-ro-{uuid.uuid4().hex[:6]}"
    shown = tidepool("api-key", "create", name, "--read-only")
    assert shown.returncode == 0, shown.stderr
    key = shown.stdout.strip().splitlines()[-1]
    try:
        assert tidepool("sandbox", "list", "-f", "json", key=key).returncode == 0  # reads need no scope
        assert tidepool("volume", "create", "never", key=key).returncode == FORBIDDEN
    finally:
        assert tidepool("api-key", "delete", name).returncode == 0
    past = tidepool("api-key", "create", f"{name}-old", "--expires", "2000-01-01T00:00:00")
    assert past.returncode == CONFLICT and "future" in past.stderr
    assert tidepool("api-key", "create", "x", "--permissions", "fly:planes").returncode == 2
    assert tidepool("api-key", "create", "x", "--expires", "soon").returncode == 2


def test_organization_create_list_usage_delete() -> None:
    name = f"cli-org-{uuid.uuid4().hex[:6]}"
    created = json_of(tidepool("organization", "create", name, "-f", "json"))
    organization, key = created["id"], created["api_key"]["value"]
    assert created["name"] == name and key

    seen = {row["id"]: row for row in json_of(tidepool("organization", "list", "-f", "json"))}
    assert organization in seen and any(row["is_admin"] for row in seen.values())
    own = json_of(tidepool("organization", "list", "-f", "json", key=key))
    assert [row["id"] for row in own] == [organization], "a tenant sees only its own organization"
    usage = json_of(tidepool("organization", "usage", "-f", "json", key=key))
    assert usage["current_cpu_usage"] == 0 and "total_cpu_quota" in usage
    assert tidepool("organization", "usage", organization, "-f", "json").returncode == 0  # the admin's key

    denied = tidepool("organization", "create", "tenant-made", key=key)
    assert denied.returncode == FORBIDDEN and "admin" in denied.stderr
    assert tidepool("organization", "delete", organization, "--yes", key=key).returncode == FORBIDDEN

    deleted = tidepool("organization", "delete", organization, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    listed = json_of(tidepool("organization", "list", "-f", "json"))
    assert organization not in [row["id"] for row in listed]
    assert tidepool("sandbox", "list", key=key).returncode == UNAUTHENTICATED  # its key was revoked
    assert tidepool("organization", "delete", organization, "--yes").returncode == NOT_FOUND


def test_mcp_init_writes_each_agents_config_and_keeps_other_servers(tmp_path: Path) -> None:
    config_home = tmp_path / ".config"
    login = tidepool(
        "login", "--api-url", os.environ["DAYTONA_API_URL"], "--api-key", os.environ["DAYTONA_API_KEY"],
        config_home=config_home,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    cursor = tmp_path / ".cursor" / "mcp.json"
    cursor.parent.mkdir()
    cursor.write_text(json.dumps({"mcpServers": {"other": {"command": "other-server"}}}))
    for agent in ("claude", "cursor", "windsurf"):
        done = tidepool("mcp", "init", agent, config_home=config_home, home=tmp_path)
        assert done.returncode == 0, done.stderr
    claude = json.loads((config_home / "Claude" / "claude_desktop_config.json").read_text())
    windsurf = json.loads((tmp_path / ".codeium" / "windsurf" / "mcp_config.json").read_text())
    servers = json.loads(cursor.read_text())["mcpServers"]
    assert servers["other"] == {"command": "other-server"}
    entry = servers["tidepool"]
    assert claude["mcpServers"]["tidepool"] == entry == windsurf["mcpServers"]["tidepool"]
    assert entry["args"] == ["mcp", "start"] and os.environ["DAYTONA_API_KEY"] not in json.dumps(entry)
    printed = json.loads(tidepool("mcp", "config", "cursor", config_home=config_home, home=tmp_path).stdout)
    assert printed["mcpServers"]["tidepool"] == entry
    assert tidepool("mcp", "init", "vscode").returncode == 2

    # What the agent would spawn, with only the configured environment: it finds the key `login` stored.
    anyio.run(list_tools_and_fail_a_call, entry)


async def list_tools_and_fail_a_call(entry: dict[str, Any]) -> None:
    params = StdioServerParameters(command=entry["command"], args=entry["args"], env=entry["env"])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        assert "execute_command" in {tool.name for tool in (await session.list_tools()).tools}
        result = await session.call_tool("execute_command", {"sandbox_id": "no-such-box", "command": "true"})
        text = "".join(getattr(block, "text", "") for block in result.content)
        assert result.is_error and "no API key" not in text and "no-such-box" in text


def test_status_of_a_data_dir_where_nothing_runs(tmp_path: Path) -> None:
    result = tidepool("status", "--data-dir", str(tmp_path))
    assert result.returncode == UNAVAILABLE and "not running" in result.stdout


def test_shell_completion_completes_commands() -> None:
    env = {
        **os.environ,
        "_TIDEPOOL_COMPLETE": "complete_bash",
        "COMP_WORDS": "tidepool api-k",
        "COMP_CWORD": "1",
    }
    completed = subprocess.run([TIDEPOOL], capture_output=True, text=True, env=env, timeout=60)
    assert completed.returncode == 0 and completed.stdout.split() == ["api-key"]
    env["COMP_WORDS"], env["COMP_CWORD"] = "tidepool organization ", "2"
    subcommands = subprocess.run(
        [TIDEPOOL], capture_output=True, text=True, env=env, timeout=60
    ).stdout.split()
    assert {"list", "create", "delete", "usage"} <= set(subcommands)


def test_sandbox_create_mounts_a_volume_by_name_and_sets_network_flags() -> None:
    name = f"cli-mount-{uuid.uuid4().hex[:6]}"
    assert tidepool("volume", "create", name).returncode == 0
    daytona = Daytona()
    wait_until(lambda: daytona.volume.get(name).state in ("ready", "error"), f"volume {name} never settled")
    assert json_of(tidepool("volume", "get", name, "-f", "json"))["state"] == "ready"
    sandbox = json_of(
        tidepool("sandbox", "create", "--volume", f"{name}:/mnt/shared", "--network-block-all", "-f", "json")
    )
    try:
        script = "echo kept > /mnt/shared/f && cat /mnt/shared/f"
        wrote = tidepool("exec", sandbox["id"], "--", "sh", "-c", script)
        assert wrote.returncode == 0 and wrote.stdout.strip() == "kept", wrote.stderr
        assert daytona.get(sandbox["id"]).network_block_all is True
    finally:
        assert tidepool("sandbox", "delete", sandbox["id"]).returncode == 0
    assert tidepool("sandbox", "create", "--volume", "no-such-volume:/mnt/x").returncode == NOT_FOUND

    def volume_deleted() -> bool:  # refused while the deleted sandbox still mounts it
        return tidepool("volume", "delete", name).returncode == 0

    wait_until(volume_deleted, "the volume never became deletable", timeout=300, interval=2)
