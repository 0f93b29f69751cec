"""`tidepool api-key list|create|delete` and `tidepool organization list|create|delete|usage`.

The SDK has no calls for these routes: they go through `client.rest` (httpx, the same credentials)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from tidepool_cli.client import rest
from tidepool_cli.output import Format, api_errors, emit, stderr

api_keys = typer.Typer(help="Manage the organization's API keys.", no_args_is_help=True)
organizations = typer.Typer(
    help="Manage organizations (create and delete: the admin organization's key only).", no_args_is_help=True
)
FormatOption = Annotated[Format, typer.Option("--format", "-f", help="table for people, json for scripts")]

KEY_COLUMNS = ("name", "value", "permissions", "created_at", "expires_at", "last_used_at")
ORGANIZATION_COLUMNS = ("id", "name", "created_at", "is_admin")
# Scopes the API knows (Daytona's OrganizationResourcePermission); the API checks them again.
PERMISSIONS = (
    "write:registries",
    "delete:registries",
    "write:snapshots",
    "delete:snapshots",
    "write:sandboxes",
    "delete:sandboxes",
    "read:volumes",
    "write:volumes",
    "delete:volumes",
    "write:regions",
    "delete:regions",
    "read:runners",
    "write:runners",
    "delete:runners",
    "read:audit_logs",
)
DURATION = re.compile(r"(\d+)([smhdw])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def snake_keys(item: dict[str, Any]) -> dict[str, Any]:
    return {snake(key): value for key, value in item.items()}


def expiry(value: str) -> datetime:
    """`30d`, `12h`, `90m`, `2w` from now, or an ISO 8601 time (UTC unless it says otherwise)."""
    match = DURATION.fullmatch(value.strip())
    if match:
        amount, unit = match.groups()
        return datetime.now(UTC) + timedelta(**{UNITS[unit]: int(amount)})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"expected a duration (30d, 12h, 90m) or an ISO 8601 time, got {value!r}", param_hint="--expires"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def permission_list(values: list[str]) -> list[str]:
    """`--permissions a,b --permissions c` into `[a, b, c]`; an unknown scope is a usage error."""
    chosen = [item.strip() for value in values for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in PERMISSIONS]
    if unknown:
        raise typer.BadParameter(
            f"unknown {', '.join(unknown)}; known: {', '.join(PERMISSIONS)}", param_hint="--permissions"
        )
    return list(dict.fromkeys(chosen))


@api_keys.command("list")
def api_key_list(fmt: FormatOption = Format.table) -> None:
    """List the organization's keys (values masked: a key's value is shown only when it is created)."""
    with api_errors():
        rows = [snake_keys(item) for item in rest("GET", "/api-keys")]
    emit(rows, KEY_COLUMNS, fmt)


@api_keys.command("create")
def api_key_create(
    name: Annotated[str, typer.Argument(help="Name of the key (unique in the organization)")],
    permissions: Annotated[
        list[str] | None,
        typer.Option(
            "--permissions",
            "-p",
            help=f"Scopes, comma-separated or repeated: {', '.join(PERMISSIONS)}. "
            "Default: the calling key's own",
        ),
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="No scope at all: reads only")] = False,
    expires: Annotated[
        str | None, typer.Option(help="When it stops working: 30d, 12h, 90m, 2w, or an ISO 8601 time")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Create a key. Its value is printed once, now: store it, it cannot be shown again."""
    if read_only and permissions:
        raise typer.BadParameter("give --permissions or --read-only, not both")
    body: dict[str, Any] = {"name": name}
    if read_only:
        body["permissions"] = []
    elif permissions:
        body["permissions"] = permission_list(permissions)
    if expires is not None:
        body["expiresAt"] = expiry(expires).isoformat()
    with api_errors():
        created = snake_keys(rest("POST", "/api-keys", json=body))
    if fmt is Format.json:
        emit([created], (), fmt, single=True)
        return
    emit([created], ("name", "permissions", "created_at", "expires_at"), fmt, single=True)
    stderr.print("The key (shown only this once):", highlight=False)
    typer.echo(created["value"])


@api_keys.command("delete")
def api_key_delete(name: Annotated[str, typer.Argument(help="Name of the key")]) -> None:
    """Revoke a key at once (the API and the toolbox proxy refuse it from now on)."""
    with api_errors():
        rest("DELETE", f"/api-keys/{name}")
    typer.echo(f"{name} deleted")


@organizations.command("list")
def organization_list(fmt: FormatOption = Format.table) -> None:
    """The organizations the key sees: every one for the admin organization's key, else its own."""
    with api_errors():
        rows = [snake_keys(item) for item in rest("GET", "/organizations")]
    emit(rows, ORGANIZATION_COLUMNS, fmt)


@organizations.command("create")
def organization_create(
    name: Annotated[str, typer.Argument(help="Name of the organization")], fmt: FormatOption = Format.table
) -> None:
    """Create an organization (admin only) with a first key holding every scope, printed once."""
    with api_errors():
        created = snake_keys(rest("POST", "/organizations", json={"name": name}))
    created["api_key"] = snake_keys(created.get("api_key") or {})
    if fmt is Format.json:
        emit([created], (), fmt, single=True)
        return
    emit([created], ("id", "name", "created_at"), fmt, single=True)
    stderr.print("Its first API key (shown only this once):", highlight=False)
    typer.echo(created["api_key"].get("value", ""))


@organizations.command("delete")
def organization_delete(
    organization: Annotated[str, typer.Argument(help="ID of the organization")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Delete an organization (admin only): its keys are revoked at once, its sandboxes deleted."""
    if not yes:
        typer.confirm(f"Delete organization {organization}, its keys and all its sandboxes?", abort=True)
    with api_errors():
        rest("DELETE", f"/organizations/{organization}")
    typer.echo(f"{organization} deleted")


@organizations.command("usage")
def organization_usage(
    organization: Annotated[str | None, typer.Argument(help="ID (default: the key's own)")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """An organization's quotas and what it uses now."""
    with api_errors():
        if organization is None:
            organization = str(rest("GET", "/api-keys/current")["organizationId"])
        usage = snake_keys(rest("GET", f"/organizations/{organization}/usage"))
    if fmt is Format.json:
        emit([usage], (), fmt, single=True)
        return
    emit([{"quota": key, "value": value} for key, value in usage.items()], ("quota", "value"), fmt)
