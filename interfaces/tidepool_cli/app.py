"""The client half of `tidepool`: login, sandbox, exec, ssh, preview-url, snapshot, volume, api-key,
organization and mcp.

`register` adds them to a Typer app (the operator's `tidepool up|down|status` lives in tidepool_stack)."""

from __future__ import annotations

from typing import Annotated

import typer

from tidepool_cli import config
from tidepool_cli.account_commands import api_keys, organizations
from tidepool_cli.mcp_commands import app as mcp_app
from tidepool_cli.sandbox_commands import app as sandbox_app
from tidepool_cli.sandbox_commands import exec_command, preview_url, ssh_command
from tidepool_cli.store_commands import snapshots, volumes


def login(
    api_url: Annotated[str, typer.Option(help="The API's URL")] = config.DEFAULT_API_URL,
    api_key: Annotated[str, typer.Option(prompt=True, hide_input=True, help="An API key")] = "",
) -> None:
    """Store the API URL and key in the user's config dir (0600); DAYTONA_API_URL/KEY still win."""
    path = config.save(config.Credentials(api_url=api_url.rstrip("/"), api_key=api_key))
    typer.echo(f"saved to {path}")


def logout() -> None:
    """Forget the stored API key (DAYTONA_API_KEY in the environment is not touched)."""
    path = config.config_path()
    path.unlink(missing_ok=True)
    typer.echo(f"removed {path}")


def register(app: typer.Typer) -> None:
    app.command()(login)
    app.command()(logout)
    app.add_typer(sandbox_app, name="sandbox")
    app.command("exec")(exec_command)
    app.command("ssh")(ssh_command)
    app.command("preview-url")(preview_url)
    app.add_typer(snapshots, name="snapshot")
    app.add_typer(volumes, name="volume")
    app.add_typer(api_keys, name="api-key")
    app.add_typer(organizations, name="organization")
    app.add_typer(mcp_app, name="mcp")
