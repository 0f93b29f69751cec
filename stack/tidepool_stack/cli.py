"""`tidepool up|down`: the whole platform on one machine; the client commands come from tidepool_cli."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tidepool_cli.app import register as register_client_commands
from tidepool_cli.output import EXIT_CODES_HELP, ExitCode
from tidepool_runtime.registry_mirrors import parse_registry_mirrors
from tidepool_runtime.settings import REPO_ROOT
from tidepool_stack.supervisor import Stack, StackConfig

app = typer.Typer(
    help="Run Tidepool on this machine, and use it: sandboxes, snapshots, volumes, keys, SSH, MCP.",
    epilog=EXIT_CODES_HELP + " Shell completion: `tidepool --install-completion`.",
)
console = Console()
DEFAULT_DATA_DIR = Path(os.environ.get("TIDEPOOL_DATA_DIR", REPO_ROOT / ".tidepool"))


def pid_file(data_dir: Path) -> Path:
    return data_dir / "stack.pid"


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where data, logs and sockets live")] = DEFAULT_DATA_DIR,
    api_port: Annotated[int, typer.Option(envvar="TIDEPOOL_API_PORT")] = 3000,
    proxy_port: Annotated[int, typer.Option(envvar="TIDEPOOL_PROXY_PORT")] = 4000,
    ssh_gateway_port: Annotated[int, typer.Option(envvar="TIDEPOOL_SSH_GATEWAY_PORT")] = 2222,
    ca_bundle: Annotated[
        str, typer.Option(envvar="TIDEPOOL_CA_BUNDLE", help="CA bundle for builds/sandboxes")
    ] = "",
    database_url: Annotated[str, typer.Option(envvar="TIDEPOOL_DATABASE_URL")] = "",
    registry_mirrors: Annotated[
        str,
        typer.Option(
            envvar="TIDEPOOL_REGISTRY_MIRRORS",
            help="Mirrors for pulls and builds: REGISTRY=MIRROR[,...], e.g. docker.io=http://127.0.0.1:5001",
        ),
    ] = "",
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background")] = False,
) -> None:
    """Start every service; print the API URL and key once the platform answers."""
    try:
        parse_registry_mirrors(registry_mirrors)
    except ValueError as error:
        raise typer.BadParameter(
            f"{error}; several mirrors of one registry: repeat it (docker.io=http://a,docker.io=http://b)",
            param_hint="--registry-mirrors / TIDEPOOL_REGISTRY_MIRRORS",
        ) from None
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if detach:
        os.environ["TIDEPOOL_REGISTRY_MIRRORS"] = registry_mirrors  # the background `up` reads it again
        start_detached(data_dir)
        return
    config = StackConfig(
        data_dir=data_dir,
        api_port=api_port,
        proxy_port=proxy_port,
        ssh_gateway_port=ssh_gateway_port,
        ca_bundle=ca_bundle,
        database_url=database_url,
        registry_mirrors=registry_mirrors,
    )
    pid_file(data_dir).write_text(str(os.getpid()))
    try:
        asyncio.run(run_foreground(config))
    finally:
        with contextlib.suppress(FileNotFoundError):
            pid_file(data_dir).unlink()


async def run_foreground(config: StackConfig) -> None:
    stack = Stack(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(stack.start())
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done and starting.exception() is None:
        env_file = stack.write_env_file()
        console.print(f"\n[bold green]Tidepool is up.[/]  (settings also in {env_file})")
        console.print(f"  export DAYTONA_API_URL={stack.api_url}")
        console.print(f"  export DAYTONA_API_KEY={stack.admin_key}\n")
        # From here on a service that dies is restarted (logged with why); only Ctrl-C or `down` stops it all.
        supervising = asyncio.create_task(stack.supervise())
        await asyncio.wait({stopping, supervising}, return_when=asyncio.FIRST_COMPLETED)
        supervising.cancel()
    elif starting in done:
        console.print(f"[bold red]Tidepool failed to start:[/] {starting.exception()}")
    else:
        starting.cancel()
    console.print("stopping…")
    await stack.stop()
    if starting in done and starting.exception() is not None:
        raise typer.Exit(1)


def start_detached(data_dir: Path) -> None:
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    env_file = data_dir / "env"
    with contextlib.suppress(FileNotFoundError):
        env_file.unlink()
    with open(logs / "stack.log", "ab") as log_handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "tidepool_stack", "up", "--data-dir", str(data_dir)],
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    console.print(f"starting in the background (pid {process.pid}, log {logs / 'stack.log'})…")
    while not env_file.exists():
        if process.poll() is not None:
            console.print(f"[bold red]Tidepool failed to start[/]; see {logs / 'stack.log'}")
            raise typer.Exit(1)
        time.sleep(0.5)
    console.print(env_file.read_text())


@app.command()
def down(data_dir: Annotated[Path, typer.Option()] = DEFAULT_DATA_DIR) -> None:
    """Stop a platform started with `up --detach`."""
    path = pid_file(data_dir.resolve())
    if not path.exists():
        console.print("Tidepool is not running.")
        return
    pid = int(path.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            os.kill(pid, 0)
            time.sleep(0.1)
    console.print("Tidepool stopped.")


def api_url_of(data_dir: Path) -> str | None:
    """The API URL `up` wrote to `<data-dir>/env` (`export DAYTONA_API_URL=…`)."""
    with contextlib.suppress(FileNotFoundError):
        for line in (data_dir / "env").read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            if name == "DAYTONA_API_URL":
                return value
    return None


@app.command()
def status(data_dir: Annotated[Path, typer.Option()] = DEFAULT_DATA_DIR) -> None:
    """Whether a platform started with `up` runs from this data dir and its API answers.

    Exit 0 when it does; 9 (unavailable) when it is not running or its API does not answer."""
    import httpx

    data_dir = data_dir.resolve()
    path = pid_file(data_dir)
    pid = int(path.read_text()) if path.exists() else None
    alive = False
    if pid is not None:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    if not alive:
        console.print(f"Tidepool is not running (data dir {data_dir}).")
        raise typer.Exit(int(ExitCode.UNAVAILABLE))
    api_url = api_url_of(data_dir)
    healthy = False
    if api_url:
        with contextlib.suppress(httpx.HTTPError):
            healthy = httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    if not healthy:
        console.print(f"Tidepool runs (pid {pid}) but its API does not answer yet ({api_url or 'no URL'}).")
        raise typer.Exit(int(ExitCode.UNAVAILABLE))
    console.print(f"[bold green]Tidepool is up[/] (pid {pid}): API {api_url}")
    console.print(f"  settings: source {data_dir / 'env'}")


@app.command("k8s-secrets")
def k8s_secrets(
    postgres: Annotated[
        bool, typer.Option(help="Include the in-cluster PostgreSQL's Secrets (component postgres)")
    ] = True,
) -> None:
    """Print every Secret deploy/k8s needs, as the bootstrap Job would create them on an empty cluster.

    For operators who create Secrets themselves: `tidepool k8s-secrets | kubectl apply -f -` once, before
    `kubectl apply -k deploy/k8s/overlays/…` (running it again replaces every credential)."""
    from tidepool_stack.k8s_secrets import k8s_secrets as generate

    sys.stdout.write(generate(postgres=postgres, registry=True))


# The client commands (`login`, `sandbox …`, `exec`, `ssh`, `preview-url`, `snapshot …`, `volume …`,
# `api-key …`, `organization …`, `mcp …`) live in tidepool_cli, which talks only to the REST API.
register_client_commands(app)

if __name__ == "__main__":
    app()
