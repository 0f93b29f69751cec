"""One pooled HTTP session per sandbox to its daemon's unix socket, plus the daemon readiness probe."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson

from tidepool_contracts.relay import SESSION_SKIP_AUTO_HEADERS

# The host part of URLs sent over a unix socket; only the Host header sees it.
DAEMON_BASE_URL = "http://daemon"
PROBE_REQUEST_TIMEOUT = 1.0


class DaemonConnections:
    """Keep-alive pools to the daemons, so a toolbox call costs no connection set-up.

    A pool is created on first use and closed when its sandbox stops or is destroyed (a restarted daemon
    listens on a new socket, so pooled connections to the old one are useless).
    """

    def __init__(self, socket_path_for: Callable[[str], Path]) -> None:
        self._socket_path_for = socket_path_for
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, sandbox_id: str) -> aiohttp.ClientSession:
        session = self._sessions.get(sandbox_id)
        if session is None or session.closed:
            connector = aiohttp.UnixConnector(
                path=str(self._socket_path_for(sandbox_id)), limit=0, keepalive_timeout=30.0
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

    async def close(self, sandbox_id: str) -> None:
        session = self._sessions.pop(sandbox_id, None)
        if session is not None:
            await session.close()

    async def close_all(self) -> None:
        for sandbox_id in list(self._sessions):
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


def _version_from_body(body: bytes) -> str:
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("version"), str):
            return parsed["version"]
        if isinstance(parsed, str):
            return parsed
    return body.decode(errors="replace").strip() or "unknown"
