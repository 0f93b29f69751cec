"""`tidepool sandbox create|list|info|start|stop|archive|delete`, `tidepool exec`, `preview-url` and `ssh`."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from typing import Annotated, Any

import typer

from tidepool_cli.client import connect
from tidepool_cli.output import ExitCode, Format, api_errors, emit, fail, pairs, record, waiting

app = typer.Typer(help="Create and manage sandboxes.", no_args_is_help=True)

FIELDS = ("id", "name", "state", "snapshot", "cpu", "memory", "disk", "labels", "public", "created_at")
COLUMNS = ("id", "name", "state", "snapshot", "cpu", "memory", "disk", "labels")
FormatOption = Annotated[Format, typer.Option("--format", "-f", help="table for people, json for scripts")]


def sandbox_record(sandbox: Any) -> dict:
    return record(sandbox, FIELDS)


@app.command()
def create(
    name: Annotated[str | None, typer.Option(help="Name of the sandbox")] = None,
    snapshot: Annotated[str | None, typer.Option(help="Snapshot to start from")] = None,
    image: Annotated[str | None, typer.Option(help="Image to start from (instead of a snapshot)")] = None,
    cpu: Annotated[int | None, typer.Option(help="CPU cores (with --image)")] = None,
    memory: Annotated[int | None, typer.Option(help="Memory in GiB (with --image)")] = None,
    disk: Annotated[int | None, typer.Option(help="Disk in GiB (with --image)")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, repeatable")] = None,
    auto_stop: Annotated[int | None, typer.Option(help="Minutes idle before it stops (0: never)")] = None,
    auto_archive: Annotated[int | None, typer.Option(help="Minutes stopped before it is archived")] = None,
    auto_delete: Annotated[int | None, typer.Option(help="Minutes stopped before it is deleted")] = None,
    public: Annotated[bool, typer.Option("--public", help="Previews need no token")] = False,
    volume: Annotated[
        list[str] | None,
        typer.Option("--volume", "-v", help="VOLUME_ID_OR_NAME:MOUNT_PATH, repeatable"),
    ] = None,
    network_block_all: Annotated[
        bool, typer.Option("--network-block-all", help="No network access out of the sandbox")
    ] = False,
    network_allow_list: Annotated[
        str | None, typer.Option(help="Only these IPv4 CIDRs out (comma-separated, e.g. 10.0.0.0/8)")
    ] = None,
    user: Annotated[str | None, typer.Option(help="OS user commands run as")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to start")] = 120,
    fmt: FormatOption = Format.table,
) -> None:
    """Create a sandbox and wait until it has started."""
    from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources

    if (cpu or memory or disk) and not image:
        raise typer.BadParameter("--cpu/--memory/--disk need --image (a snapshot brings its own)")
    if image and snapshot:
        raise typer.BadParameter("give --snapshot or --image, not both")
    common = dict(
        name=name,
        env_vars=pairs(env or [], "--env") or None,
        labels=pairs(label or [], "--label") or None,
        auto_stop_interval=auto_stop,
        auto_archive_interval=auto_archive,
        auto_delete_interval=auto_delete,
        public=public or None,
        network_block_all=network_block_all or None,
        network_allow_list=network_allow_list,
        os_user=user,
    )
    mounts = [mount_of(value) for value in volume or []]
    params = (
        CreateSandboxFromImageParams(
            image=image, resources=Resources(cpu=cpu, memory=memory, disk=disk), **common
        )
        if image
        else CreateSandboxFromSnapshotParams(snapshot=snapshot, **common)
    )
    with api_errors():
        daytona = connect()
        if mounts:
            params.volumes = [volume_mount(daytona, name, path) for name, path in mounts]
        with waiting("creating the sandbox…"):
            sandbox = daytona.create(params, timeout=timeout)
        emit([sandbox_record(sandbox)], COLUMNS, fmt, single=True)


def mount_of(value: str) -> tuple[str, str]:
    name, sep, path = value.partition(":")
    if not sep or not name or not path.startswith("/"):
        raise typer.BadParameter(f"expected VOLUME:/ABSOLUTE/PATH, got {value!r}", param_hint="--volume")
    return name, path


def volume_mount(daytona: Any, name: str, path: str) -> Any:
    """A volume by ID or name (the API mounts by ID, as Daytona's CLI resolves it)."""
    from daytona import DaytonaNotFoundError, VolumeMount

    try:
        found = daytona.volume.get(name)
    except DaytonaNotFoundError:
        found = next((item for item in daytona.volume.list() if item.id == name), None)
        if found is None:
            raise
    return VolumeMount(volume_id=found.id, mount_path=path)


@app.command("list")
def list_(
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE filter")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """List the organization's sandboxes."""
    from daytona import ListSandboxesQuery

    labels = pairs(label or [], "--label") or None
    with api_errors():
        rows = [sandbox_record(item) for item in connect().list(ListSandboxesQuery(labels=labels))]
        emit(rows, COLUMNS, fmt)


@app.command()
def info(
    sandbox: Annotated[str, typer.Argument(help="ID or name")], fmt: FormatOption = Format.table
) -> None:
    """Show one sandbox."""
    with api_errors():
        emit([sandbox_record(connect().get(sandbox))], FIELDS, fmt, single=True)


@app.command()
def start(sandbox: Annotated[str, typer.Argument(help="ID or name")], timeout: float = 120) -> None:
    """Start a stopped or archived sandbox and wait until it runs."""
    with api_errors():
        found = connect().get(sandbox)
        with waiting(f"starting {found.id}…"):
            found.start(timeout=timeout)
        typer.echo(f"{found.id} started")


@app.command()
def stop(sandbox: Annotated[str, typer.Argument(help="ID or name")], timeout: float = 120) -> None:
    """Stop a sandbox and wait until it has stopped."""
    with api_errors():
        found = connect().get(sandbox)
        with waiting(f"stopping {found.id}…"):
            found.stop(timeout=timeout)
        typer.echo(f"{found.id} stopped")


@app.command()
def archive(sandbox: Annotated[str, typer.Argument(help="ID or name")]) -> None:
    """Archive a stopped sandbox (its filesystem goes to object storage)."""
    with api_errors():
        found = connect().get(sandbox)
        found.archive()
        typer.echo(f"{found.id} archiving")


@app.command()
def delete(sandbox: Annotated[str, typer.Argument(help="ID or name")]) -> None:
    """Delete a sandbox."""
    with api_errors():
        found = connect().get(sandbox)
        with waiting(f"deleting {found.id}…"):
            found.delete()
        typer.echo(f"{found.id} deleted")


def exec_command(
    sandbox: Annotated[str, typer.Argument(help="ID or name")],
    command: Annotated[list[str], typer.Argument(help="The command and its arguments, after --")],
    cwd: Annotated[str | None, typer.Option(help="Working directory")] = None,
    timeout: Annotated[int | None, typer.Option(help="Seconds before the command is killed")] = None,
) -> None:
    """Run a command in a sandbox; its output is printed and its exit code is this command's."""
    with api_errors():
        response = connect().get(sandbox).process.exec(shlex.join(command), cwd=cwd, timeout=timeout)
    sys.stdout.write(response.result)
    if response.result and not response.result.endswith("\n"):
        sys.stdout.write("\n")
    raise typer.Exit(response.exit_code)


def preview_url(
    sandbox: Annotated[str, typer.Argument(help="ID or name")],
    port: Annotated[int, typer.Option("--port", "-p", help="Port in the sandbox")],
    expires: Annotated[
        int | None, typer.Option(help="Seconds a signed URL (token inside) stays valid")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Print the URL of a port in the sandbox (signed, token in the URL, with --expires)."""
    with api_errors():
        found = connect().get(sandbox)
        if expires is None:
            link = found.get_preview_link(port)
        else:
            link = found.create_signed_preview_url(port, expires_in_seconds=expires)
    if fmt is Format.json:
        emit([{"url": link.url, "token": link.token, "port": port}], (), fmt, single=True)
    else:
        typer.echo(link.url)


def ssh_command(
    sandbox: Annotated[str, typer.Argument(help="ID or name")],
    ssh_args: Annotated[
        list[str] | None,
        typer.Argument(help="After --: more ssh options and/or a remote command (ssh parses both)"),
    ] = None,
    expires: Annotated[int, typer.Option(help="Minutes the access token stays valid")] = 1440,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the ssh command instead of running it")
    ] = False,
) -> None:
    """Open an SSH session to a sandbox through the SSH gateway (OpenSSH's `ssh`, with a fresh token).

    `tidepool ssh SB -- -o StrictHostKeyChecking=no 'echo hi'` runs one command; the exit status is ssh's
    (the remote command's, or 255 when ssh itself fails). A new token revokes the sandbox's earlier ones."""
    with api_errors():
        access = connect().get(sandbox).create_ssh_access(expires_in_minutes=expires)
    argv = [*shlex.split(access.ssh_command), *(ssh_args or [])]
    if print_only:
        typer.echo(shlex.join(argv))
        return
    program = shutil.which(argv[0])
    if program is None:
        raise fail(f"no `{argv[0]}` on PATH (install OpenSSH's client); or use --print", ExitCode.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(program, argv)
