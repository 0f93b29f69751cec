"""`tidepool snapshot create|list|delete` (build logs streamed) and `tidepool volume create|list|delete`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tidepool_cli.client import connect
from tidepool_cli.output import Format, api_errors, emit, record, stderr, waiting

snapshots = typer.Typer(help="Build and manage snapshots.", no_args_is_help=True)
volumes = typer.Typer(help="Manage shared volumes.", no_args_is_help=True)
FormatOption = Annotated[Format, typer.Option("--format", "-f", help="table for people, json for scripts")]

SNAPSHOT_FIELDS = ("id", "name", "image_name", "state", "cpu", "mem", "disk", "error_reason", "created_at")
SNAPSHOT_COLUMNS = ("id", "name", "image_name", "state", "cpu", "mem", "disk")
VOLUME_FIELDS = ("id", "name", "state", "created_at", "error_reason")


@snapshots.command("create")
def snapshot_create(
    name: Annotated[str, typer.Argument(help="Name of the snapshot")],
    image: Annotated[str | None, typer.Option(help="Image to register (e.g. python:3.12-slim)")] = None,
    dockerfile: Annotated[Path | None, typer.Option(help="Dockerfile to build")] = None,
    cpu: Annotated[int | None, typer.Option(help="Default CPU cores")] = None,
    memory: Annotated[int | None, typer.Option(help="Default memory in GiB")] = None,
    disk: Annotated[int | None, typer.Option(help="Default disk in GiB")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Create a snapshot from an image or a Dockerfile; the build's log is streamed to stderr."""
    from daytona import CreateSnapshotParams, Image, Resources

    if (image is None) == (dockerfile is None):
        raise typer.BadParameter("give exactly one of --image and --dockerfile")
    source: Any = image if image is not None else Image.from_dockerfile(dockerfile)
    resources = Resources(cpu=cpu, memory=memory, disk=disk) if (cpu or memory or disk) else None
    with api_errors():
        client = connect()
        # The spinner stays below the streamed log lines (rich prints them above it), all on stderr.
        step = "uploading its build context, then building" if dockerfile else "pulling and registering"
        with waiting(f"snapshot {name}: {step}…"):
            snapshot = client.snapshot.create(
                CreateSnapshotParams(name=name, image=source, resources=resources),
                on_logs=lambda line: stderr.print(line.rstrip("\n"), highlight=False, markup=False),
            )
        emit([record(snapshot, SNAPSHOT_FIELDS)], SNAPSHOT_COLUMNS, fmt, single=True)


@snapshots.command("list")
def snapshot_list(fmt: FormatOption = Format.table) -> None:
    """List the organization's snapshots."""
    with api_errors():
        found = connect().snapshot.list()
        items = getattr(found, "items", found)
        emit([record(item, SNAPSHOT_FIELDS) for item in items], SNAPSHOT_COLUMNS, fmt)


@snapshots.command("delete")
def snapshot_delete(name: Annotated[str, typer.Argument(help="Name of the snapshot")]) -> None:
    """Delete a snapshot."""
    with api_errors():
        client = connect()
        client.snapshot.delete(client.snapshot.get(name))
        typer.echo(f"{name} deleted")


@volumes.command("create")
def volume_create(name: Annotated[str, typer.Argument()], fmt: FormatOption = Format.table) -> None:
    """Create a volume."""
    with api_errors():
        client = connect()
        with waiting(f"creating volume {name}…"):
            volume = client.volume.create(name)
        emit([record(volume, VOLUME_FIELDS)], VOLUME_FIELDS, fmt, single=True)


@volumes.command("list")
def volume_list(fmt: FormatOption = Format.table) -> None:
    """List the organization's volumes."""
    with api_errors():
        emit([record(item, VOLUME_FIELDS) for item in connect().volume.list()], VOLUME_FIELDS, fmt)


@volumes.command("get")
def volume_get(name: Annotated[str, typer.Argument()], fmt: FormatOption = Format.table) -> None:
    """Show one volume."""
    with api_errors():
        emit([record(connect().volume.get(name), VOLUME_FIELDS)], VOLUME_FIELDS, fmt, single=True)


@volumes.command("delete")
def volume_delete(name: Annotated[str, typer.Argument()]) -> None:
    """Delete a volume (refused while a sandbox mounts it)."""
    with api_errors():
        client = connect()
        client.volume.delete(client.volume.get(name))
        typer.echo(f"{name} deleted")
