"""Runs a whole Tidepool stack on a background event loop, so synchronous SDK tests can drive it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from tidepool_stack.supervisor import CONTAINERS_CONF, Stack, StackConfig, free_port

T = TypeVar("T")


class StackThread:
    def __init__(
        self,
        data_dir: Path,
        database_url: str = "",
        extra_env: dict[str, str] | None = None,
        registry_mirrors: str = "",
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "stack.log"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tidepool-stack", daemon=True)
        self.thread.start()
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed in stop)
        # Like `make`: trust the host's bundle unless told otherwise (TLS-intercepting proxy here).
        host_bundle = "/etc/ssl/certs/ca-certificates.crt"
        ca_bundle = os.environ.get("TIDEPOOL_CA_BUNDLE", host_bundle if os.path.exists(host_bundle) else "")
        # The private-registry tests serve one on loopback: the one host registry this stack allows.
        self.private_registry_port = free_port()
        self.config = StackConfig(
            data_dir=data_dir,
            api_port=free_port(),
            proxy_port=free_port(),
            ssh_gateway_port=free_port(),
            database_url=database_url,
            ca_bundle=ca_bundle,
            registry_mirrors=registry_mirrors,
            extra_env={
                # Tests kill services on purpose: resend unanswered jobs sooner than in production.
                "TIDEPOOL_JOB_RESEND_AFTER_SECONDS": "20",
                "TIDEPOOL_LOG_LEVEL": "INFO",
                # Tests wedge toolbox daemons on purpose: notice it sooner than in production (the
                # timeout stays generous, so a loaded test machine is not mistaken for a wedged daemon).
                "TIDEPOOL_DAEMON_HEALTH_INTERVAL_SECONDS": "2",
                "TIDEPOOL_DAEMON_HEALTH_TIMEOUT_SECONDS": "5",
                "TIDEPOOL_DAEMON_HEALTH_FAILURES": "2",
                "TIDEPOOL_DAEMON_RESTART_WAIT_SECONDS": "15",
                # Sandbox resource samples every second, so a metrics test sees several within moments.
                "TIDEPOOL_SANDBOX_METRICS_INTERVAL_SECONDS": "1",
                "TIDEPOOL_ALLOWED_HOST_REGISTRIES": f'["127.0.0.1:{self.private_registry_port}"]',
                # No configured warm pool: each test decides whether its creates are cold or claims (the
                # warm-pool tests make their pools through the SDK); pools are checked every half second.
                "TIDEPOOL_WARM_POOL_SNAPSHOTS": "[]",
                "TIDEPOOL_WARM_POOL_TICK_SECONDS": "0.5",
                # The webhook and OTLP receivers of the tests listen on plain http on loopback, which tenants'
                # destinations may not reach unless the operator allows it; a webhook receiver that was
                # down is retried at least every 5 s, so its backlog arrives soon after it is back.
                "TIDEPOOL_WEBHOOK_ALLOW_INSECURE_URLS": "true",
                "TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS": "127.0.0.0/8,::1",
                "TIDEPOOL_WEBHOOK_RETRY_MAX_SECONDS": "5",
                **(extra_env or {}),
            },
            untrust_ca_on_stop=True,
        )
        self.stack = Stack(self.config, sink=self._write)

    def _write(self, service: str, line: str) -> None:
        self._log.write(f"{service:<10}| {line}\n")

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def start(self, wait_for_default_snapshot: bool = True) -> None:
        """`wait_for_default_snapshot=False`: ready once the services answer (for tests that never use the
        default snapshot, while its first build still runs)."""
        self.run(self.stack.start(wait_for_default_snapshot), timeout=3600)

    def stop(self) -> None:
        try:
            self.run(self.stack.stop(), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self._log.close()
            release_sandboxes(self.data_dir)

    def kill(self, service: str) -> None:
        self.run(self.stack.kill_service(service), timeout=30)

    def restart(self, service: str) -> None:
        self.run(self.stack.start_service(service), timeout=30)

    @property
    def api_url(self) -> str:
        return self.stack.api_url

    @property
    def api_key(self) -> str:
        return self.stack.admin_key

    @property
    def proxy_url(self) -> str:
        return f"http://localhost:{self.config.proxy_port}"

    @property
    def docker_host(self) -> str:
        return self.stack.env["TIDEPOOL_DOCKER_HOST"]


def release_sandboxes(data_dir: Path) -> None:
    """What a test stack leaves on the host once its services are gone: the sandbox containers it made
    (one per disk under `disks/`), their disks' mounts and loop devices, and the runner's tmpfs. A real
    platform keeps all of these across restarts; a test's temporary data dir must not."""
    disks = sorted((data_dir / "disks").glob("*.img"))
    ready = sorted((data_dir / "disks" / "pool").glob("*.img"))  # formatted ahead of creates
    devices: set[str] = set()
    for image in disks + ready:
        attached = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
        for line in attached.splitlines():
            rdev = os.stat(line.split(":", 1)[0]).st_rdev
            devices.add(f"{os.major(rdev)}:{os.minor(rdev)}")
    targets = [
        fields[4]
        for fields in (line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines())
        if fields[2] in devices
    ]
    if os.path.ismount(data_dir / "run"):
        targets.append(str(data_dir / "run"))
    for target in sorted(targets, key=len, reverse=True):  # nested mounts first
        subprocess.run(["umount", "--lazy", target], capture_output=True)
    names = [f"tidepool-{image.stem}" for image in disks]
    if names:
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}  # runc: crun fails on this host
        subprocess.run(["podman", "rm", "--force", "--ignore", *names], capture_output=True, env=env)
    for image in disks + ready:
        image.unlink(missing_ok=True)


def run_on_postgres_server(base_url: str, statement: str) -> None:
    """Run one statement on the server of `base_url`, from its `postgres` maintenance database."""
    import asyncpg

    parts = urlsplit(base_url)
    admin_dsn = urlunsplit(("postgresql", parts.netloc, "/postgres", "", ""))

    async def run() -> None:
        connection = await asyncpg.connect(admin_dsn)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def fresh_postgres_database(base_url: str) -> tuple[str, str]:
    """Create an empty database next to the one in `base_url`; returns (url, name)."""
    name = f"tidepool_it_{secrets.token_hex(4)}"
    run_on_postgres_server(base_url, f'CREATE DATABASE "{name}"')
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", "")), name


def drop_postgres_database(base_url: str, name: str) -> None:
    run_on_postgres_server(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def own_stack(
    data_dir: Path, wait_for_default_snapshot: bool = True, **options: Any
) -> Iterator[StackThread]:
    """A test module's own stack (settings the session's stack does not have: `options` are StackThread's),
    on a fresh PostgreSQL database when TIDEPOOL_DATABASE_URL names a server (SQLite otherwise); stopped,
    and its database dropped, after."""
    base_url = os.environ.get("TIDEPOOL_DATABASE_URL", "")
    database_url, database_name = fresh_postgres_database(base_url) if base_url else ("", "")
    running = StackThread(data_dir, database_url=database_url, **options)
    try:
        running.start(wait_for_default_snapshot)
        yield running
    finally:
        running.stop()
        if database_name:
            drop_postgres_database(base_url, database_name)
