"""The asyncssh server: the user name is the SSH access token; no password or key is asked (like Daytona's
gateway). A token that opens nothing offers no authentication method, so the client is refused
("Permission denied") before any channel opens. Port forwarding and agent/X11 forwarding are refused.
"""

from __future__ import annotations

import asyncssh
import structlog

from tidepool_ssh_gateway.grants import Grants, Refused, Target
from tidepool_ssh_gateway.sandbox_session import SandboxSessions

log = structlog.get_logger("tidepool.ssh_gateway")


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class TokenServer(asyncssh.SSHServer):
    def __init__(self, grants: Grants, sessions: SandboxSessions) -> None:
        self._grants = grants
        self._sessions = sessions
        self._connection: asyncssh.SSHServerConnection | None = None
        self._target: Target | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn

    async def begin_auth(self, username: str) -> bool:
        """False (no authentication needed) for a valid token; True with no method offered otherwise."""
        try:
            target = await self._grants.authorize(username)
        except Refused as refused:
            log.info("ssh_gateway.refused", reason=str(refused))
            return True
        except Exception as error:  # NATS unreachable: refuse rather than guess
            log.warning("ssh_gateway.lookup_failed", error=str(error))
            return True
        self._target = target
        if self._connection is not None:
            self._connection.set_extra_info(tidepool_target=target)
        log.info("ssh_gateway.login", sandbox_id=target.sandbox_id)
        return False

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):  # type: ignore[no-untyped-def]
        """`ssh -L`: a handler carrying the connection to the port inside the sandbox; False refuses."""
        target = self._target
        if (
            target is None
            or dest_host.strip("[]").lower() not in LOOPBACK_NAMES
            or not 1 <= dest_port <= 65535
        ):
            return False
        sessions = self._sessions

        async def carry(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
            await sessions.forward(target, dest_port, reader, writer)

        return carry

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False


def session_handler(sessions: SandboxSessions):  # type: ignore[no-untyped-def]
    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        target: Target | None = process.get_extra_info("tidepool_target")
        if target is None:  # pragma: no cover - asyncssh opens no session before authentication
            process.exit(255)
            return
        await sessions.run(target, process)

    return handle


async def start_server(
    host: str, port: int, host_key: asyncssh.SSHKey, grants: Grants, sessions: SandboxSessions
) -> asyncssh.SSHAcceptor:
    return await asyncssh.create_server(
        lambda: TokenServer(grants, sessions),
        host,
        port,
        server_host_keys=[host_key],
        process_factory=session_handler(sessions),
        encoding=None,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        line_editor=False,
    )
