"""`tidepool mcp [start]` runs the MCP server; `tidepool mcp init|config claude|cursor|windsurf` sets up an
agent to spawn it (Daytona's `daytona mcp init|config|start`)."""

from __future__ import annotations

import enum
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tidepool_cli import config
from tidepool_cli.output import ExitCode, fail, stderr

app = typer.Typer(
    help="The MCP server: `tidepool mcp` (or `mcp start`) runs it; `mcp init AGENT` configures an agent.",
    invoke_without_command=True,
)
SERVER_NAME = "tidepool"


class Agent(enum.StrEnum):
    claude = "claude"
    cursor = "cursor"
    windsurf = "windsurf"


HttpOption = Annotated[bool, typer.Option("--http", help="Streamable HTTP instead of stdio")]
HostOption = Annotated[str, typer.Option(help="Address for --http")]
PortOption = Annotated[int, typer.Option(help="Port for --http")]


def run(http: bool, host: str, port: int) -> None:
    from tidepool_cli.mcp_server import build

    server = build()
    if http:
        server.run("streamable-http", host=host, port=port)
    else:
        server.run("stdio")


@app.callback()
def mcp(
    context: typer.Context, http: HttpOption = False, host: HostOption = "127.0.0.1", port: PortOption = 8765
) -> None:
    """Run the MCP server (stdio by default; `--http --port N` for streamable HTTP at /mcp)."""
    if context.invoked_subcommand is None:
        run(http, host, port)


@app.command()
def start(http: HttpOption = False, host: HostOption = "127.0.0.1", port: PortOption = 8765) -> None:
    """Run the MCP server (what an agent spawns): stdio, or streamable HTTP at /mcp with --http."""
    run(http, host, port)


def config_file(agent: Agent) -> Path:
    """Where each agent reads its MCP servers from (on Linux; Claude Desktop's macOS path on macOS)."""
    home = Path.home()
    if agent is Agent.claude:
        if sys.platform == "darwin":
            return home / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
        base = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        return base / "Claude" / "claude_desktop_config.json"
    if agent is Agent.cursor:
        return home / ".cursor" / "mcp.json"
    return home / ".codeium" / "windsurf" / "mcp_config.json"


def server_entry() -> dict[str, Any]:
    """The agent spawns `tidepool mcp start`, which reads the key `tidepool login` stored (never copied
    into the agent's file): the environment passes what that lookup needs."""
    running = Path(sys.argv[0])
    if running.name == "tidepool" and running.exists():
        command = str(running.absolute())  # this very installation, whatever else is on PATH
    else:
        command = shutil.which("tidepool") or str(Path(sys.executable).parent / "tidepool")
    env = {"HOME": str(Path.home())}
    if os.environ.get("XDG_CONFIG_HOME"):
        env["XDG_CONFIG_HOME"] = os.environ["XDG_CONFIG_HOME"]
    return {"command": command, "args": ["mcp", "start"], "env": env}


@app.command("config")
def config_command(agent: Annotated[Agent, typer.Argument(help="claude, cursor or windsurf")]) -> None:
    """Print the JSON to add to the agent's MCP configuration."""
    del agent  # the same entry suits every agent; the argument mirrors Daytona's command
    typer.echo(json.dumps({"mcpServers": {SERVER_NAME: server_entry()}}, indent=2))


@app.command()
def init(agent: Annotated[Agent, typer.Argument(help="claude, cursor or windsurf")]) -> None:
    """Add the Tidepool server to the agent's MCP configuration (other servers in it are kept)."""
    path = config_file(agent)
    current: dict[str, Any] = {}
    if path.exists():
        try:
            current = json.loads(path.read_text() or "{}")
        except ValueError:
            raise fail(f"{path} is not JSON: fix or remove it first", ExitCode.ERROR) from None
        if not isinstance(current, dict):
            raise fail(f"{path} does not hold a JSON object", ExitCode.ERROR)
    servers = current.setdefault("mcpServers", {})
    servers[SERVER_NAME] = server_entry()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n")
    typer.echo(f"{agent.value}: the `{SERVER_NAME}` MCP server added to {path}")
    if not config.config_path().exists():
        stderr.print("note: run `tidepool login` first: the server reads its API key from there")
