"""Start-up of the SSH gateway: NATS (reads the SSH access and route buckets only), the host key, the runner
connection pool and the SSH listener, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncssh
import structlog

from tidepool_contracts import channels
from tidepool_contracts.access import SSH_GATEWAY
from tidepool_runtime.broker import Bus, connect
from tidepool_runtime.health import Health, bus_check, serve_health
from tidepool_runtime.settings import SshGatewaySettings
from tidepool_ssh_gateway.grants import Grants
from tidepool_ssh_gateway.sandbox_session import SandboxSessions
from tidepool_ssh_gateway.server import start_server

log = structlog.get_logger("tidepool.ssh_gateway")
HOST_KEY_FILE = "ssh_host_ed25519_key"
RUNNER_CONNECT_TIMEOUT_SECONDS = 10.0


def load_host_key(configured: str, data_dir: Path) -> asyncssh.SSHKey:
    """The configured key file, or one generated once under data_dir (0600) and reused."""
    if configured:
        return asyncssh.read_private_key(configured)
    path = data_dir / HOST_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(key.export_private_key())
        temporary.chmod(0o600)
        temporary.replace(path)
    return asyncssh.read_private_key(str(path))


async def main(settings: SshGatewaySettings, stop: asyncio.Event) -> None:
    connected: list[Bus] = []
    probes = await serve_health(
        Health("ssh_gateway", {"nats": bus_check(lambda: connected[0] if connected else None)}),
        settings.health_host,
        settings.health_port,
    )
    bus = await connect(
        settings.nats_url,
        name="tidepool-ssh-gateway",
        access=SSH_GATEWAY,
        replicas=settings.nats_replicas,
        create_streams=settings.bus_create_streams,
        **settings.nats_login,
    )
    connected.append(bus)
    runners = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=RUNNER_CONNECT_TIMEOUT_SECONDS)
    )
    try:
        grants = Grants(await bus.kv(channels.SSH_ACCESS), await bus.kv(channels.ROUTES))
        host_key = load_host_key(settings.ssh_gateway_host_key, settings.data_dir)
        server = await start_server(
            settings.ssh_gateway_host,
            settings.ssh_gateway_port,
            host_key,
            grants,
            SandboxSessions(runners, settings.runner_token),
        )
        log.info("ssh_gateway.started", host=settings.ssh_gateway_host, port=settings.ssh_gateway_port)
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()
    finally:
        await runners.close()
        await bus.close()
        if probes is not None:
            await probes.cleanup()
