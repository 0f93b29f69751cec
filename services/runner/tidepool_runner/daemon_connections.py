"""One pooled HTTP session per sandbox to its daemon's unix socket, plus the daemon readiness probe.

The socket lives in a folder the sandbox can write to (as its own root), so the runner, which is the host's
root, must never trust the path (issue #7): a symlink or a swapped file there could point it at the host's
container engine or another sandbox. Every new connection therefore

- opens the socket folder and then the socket itself with `O_PATH | O_NOFOLLOW` (no link is followed,
  not even a `..` trick in the last component), checks that it is a socket, and connects through the
  `/proc/self/fd/N` handle of that very inode, so the checked file is the one connected to;
- checks the peer's credentials (`SO_PEERCRED`): the listening process must run as the uid that owns the
  socket folder, which the runner set to the sandbox's own root (a uid of its private user namespace
  range) and which is never the host's root.

A connection that fails either check is refused before a byte is sent, so it never enters the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp.client_exceptions import UnixClientConnectorError
from aiohttp.helpers import ceil_timeout

from tidepool_runner.backend import TOOLBOX_BASE_URL, ToolboxUnreachableError
from tidepool_runtime.relay import SESSION_SKIP_AUTO_HEADERS

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.tracing import Trace

# The host part of URLs sent over a unix socket; only the Host header sees it.
DAEMON_BASE_URL = TOOLBOX_BASE_URL
TOOLBOX_SOCKET_NAME = "toolbox.sock"
PROBE_REQUEST_TIMEOUT = 1.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class UntrustedDaemonSocketError(OSError):
    """The toolbox socket is not the sandbox daemon's own (a link, not a socket, or a foreign peer)."""


async def connect_daemon_socket(socket_dir: Path, name: str = TOOLBOX_SOCKET_NAME) -> socket.socket:
    """A connected, non-blocking unix socket to `socket_dir/name`, verified as described in the module doc.

    Raises UntrustedDaemonSocketError when a check fails, or the OSError of the open/connect (e.g.
    FileNotFoundError, ConnectionRefusedError) while the daemon is not listening yet.
    """
    socket_fd, owner = _open_socket_inode(socket_dir, name)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # Connecting through the O_PATH handle reaches exactly the inode checked above.
            await _connect_nonblocking(sock, f"/proc/self/fd/{socket_fd}")
            _pid, peer_uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if peer_uid != owner:
                raise UntrustedDaemonSocketError(
                    f"the process behind {socket_dir}/{name} runs as uid {peer_uid}, not as {owner}"
                )
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(socket_fd)
    return sock


def _open_socket_inode(socket_dir: Path, name: str) -> tuple[int, int]:
    """An O_PATH handle on the socket (never through a link) and the uid owning its folder."""
    dir_fd = os.open(socket_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(dir_fd).st_uid
        if owner == 0:
            raise UntrustedDaemonSocketError(f"{socket_dir} belongs to the host's root, not to a sandbox")
        try:
            socket_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UntrustedDaemonSocketError(f"{socket_dir}/{name} is a symbolic link") from None
            raise
    finally:
        os.close(dir_fd)
    if not stat.S_ISSOCK(os.fstat(socket_fd).st_mode):
        os.close(socket_fd)
        raise UntrustedDaemonSocketError(f"{socket_dir}/{name} is not a socket")
    return socket_fd, owner


async def _connect_nonblocking(sock: socket.socket, path: str) -> None:
    """A unix connect never waits for the peer, but fails with EAGAIN while its accept backlog is full:
    retry then, instead of blocking the event loop (the caller's connect timeout bounds the wait)."""
    delay = 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


class DaemonSocketConnector(aiohttp.UnixConnector):
    """aiohttp's unix connector, but every new connection goes through `connect_daemon_socket`."""

    def __init__(self, socket_dir: Path, **kwargs: object) -> None:
        super().__init__(path=str(socket_dir / TOOLBOX_SOCKET_NAME), **kwargs)  # type: ignore[arg-type]
        self._socket_dir = socket_dir

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        try:
            async with ceil_timeout(timeout.sock_connect, ceil_threshold=timeout.ceil_threshold):
                # A unix connect either completes or fails at once (backlog full: EAGAIN), no waiting.
                sock = await connect_daemon_socket(self._socket_dir)
                _, proto = await self._loop.create_unix_connection(self._factory, sock=sock)
        except OSError as error:
            raise UnixClientConnectorError(self.path, req.connection_key, error) from error
        return proto


class PortTunnelError(OSError):
    """The daemon could not open the tunnel to the sandbox's port (nothing listens there)."""


async def open_port_tunnel(sock: socket.socket, port: int) -> None:
    """Turn a verified daemon connection into a byte tunnel to `port` on the sandbox's loopback
    (the daemon's `CONNECT`, see tidepool_daemon.port_forward). Reads the answer's head byte by byte, so
    not one byte of the tunnelled stream is consumed here."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(
        sock, f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()
    )
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        byte = await loop.sock_recv(sock, 1)
        if not byte or len(head) > _TUNNEL_HEAD_LIMIT:
            raise PortTunnelError(errno.ECONNRESET, "the sandbox daemon closed the tunnel")
        head += byte
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        raise PortTunnelError(errno.ECONNREFUSED, f"nothing answers on port {port} in the sandbox")


_TUNNEL_HEAD_LIMIT = 8192


class PortTunnelConnector(DaemonSocketConnector):
    """Every new connection is a verified daemon connection turned into a tunnel to one sandbox port."""

    def __init__(self, socket_dir: Path, port: int, **kwargs: object) -> None:
        super().__init__(socket_dir, **kwargs)
        self._port = port

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        try:
            async with ceil_timeout(timeout.sock_connect, ceil_threshold=timeout.ceil_threshold):
                sock = await connect_daemon_socket(self._socket_dir)
                try:
                    await open_port_tunnel(sock, self._port)
                    _, proto = await self._loop.create_unix_connection(self._factory, sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except OSError as error:
            raise UnixClientConnectorError(self.path, req.connection_key, error) from error
        return proto


class DaemonConnections:
    """Keep-alive pools to the daemons, so a toolbox call costs no connection set-up.

    A pool is created on first use and closed when its sandbox stops or is destroyed (a restarted daemon
    listens on a new socket, so pooled connections to the old one are useless). Only connections that
    passed `connect_daemon_socket`'s checks are ever pooled.
    """

    def __init__(self, socket_dir_for: Callable[[str], Path]) -> None:
        self._socket_dir_for = socket_dir_for
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._port_sessions: dict[tuple[str, int], aiohttp.ClientSession] = {}

    def socket_dir(self, sandbox_id: str) -> Path:
        """The host folder holding the sandbox's toolbox socket."""
        return self._socket_dir_for(sandbox_id)

    def session(self, sandbox_id: str) -> aiohttp.ClientSession:
        session = self._sessions.get(sandbox_id)
        if session is None or session.closed:
            connector = DaemonSocketConnector(
                self._socket_dir_for(sandbox_id), limit=0, keepalive_timeout=30.0
            )
            session = aiohttp.ClientSession(
                connector=connector,
                # No total timeout: execs, log follows and transfers may legitimately run for hours.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                auto_decompress=False,
                skip_auto_headers=SESSION_SKIP_AUTO_HEADERS,
            )
            self._sessions[sandbox_id] = session
        return session

    def port_session(self, sandbox_id: str, port: int) -> aiohttp.ClientSession:
        """A pool of tunnels to `port` inside the sandbox (previews); closed with the sandbox's pool."""
        key = (sandbox_id, port)
        session = self._port_sessions.get(key)
        if session is None or session.closed:
            connector = PortTunnelConnector(
                self._socket_dir_for(sandbox_id), port, limit=0, keepalive_timeout=15.0
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
                auto_decompress=False,
                skip_auto_headers=SESSION_SKIP_AUTO_HEADERS,
            )
            self._port_sessions[key] = session
        return session

    async def open_tunnel(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to `port` on the sandbox's loopback over a verified daemon connection (the
        daemon's `CONNECT`). Raises ToolboxUnreachableError if the daemon cannot be reached, another
        OSError if nothing answers on the port."""
        try:
            sock = await connect_daemon_socket(self.socket_dir(sandbox_id))
        except OSError as error:
            raise ToolboxUnreachableError(f"sandbox {sandbox_id} is not reachable: {error}") from error
        try:
            await open_port_tunnel(sock, port)
            return await asyncio.open_unix_connection(sock=sock)
        except OSError:
            sock.close()
            raise

    async def close(self, sandbox_id: str) -> None:
        session = self._sessions.pop(sandbox_id, None)
        if session is not None:
            await session.close()
        for key in [key for key in self._port_sessions if key[0] == sandbox_id]:
            await self._port_sessions.pop(key).close()

    async def close_all(self) -> None:
        for sandbox_id in {*self._sessions, *(key[0] for key in self._port_sessions)}:
            await self.close(sandbox_id)

    async def probe_version(self, sandbox_id: str) -> str | None:
        """The daemon's version if it answers `GET /version` now, else None."""
        try:
            async with self.session(sandbox_id).get(
                f"{DAEMON_BASE_URL}/version", timeout=aiohttp.ClientTimeout(total=PROBE_REQUEST_TIMEOUT)
            ) as response:
                if response.status != 200:
                    return None
                body = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        return _version_from_body(body)

    async def set_env(self, sandbox_id: str, env: dict[str, str]) -> None:
        """`POST /env {"set": env}`: processes the daemon starts from now on inherit `env` (running ones keep
        theirs). Raises aiohttp.ClientError or OSError when the daemon cannot be reached or refuses."""
        async with self.session(sandbox_id).post(
            f"{DAEMON_BASE_URL}/env", json={"set": env}, timeout=aiohttp.ClientTimeout(total=10.0)
        ) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=await response.text()
                )


def _version_from_body(body: bytes) -> str:
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("version"), str):
            return parsed["version"]
        if isinstance(parsed, str):
            return parsed
    return body.decode(errors="replace").strip() or "unknown"
