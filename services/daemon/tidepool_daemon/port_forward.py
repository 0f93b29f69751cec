"""`CONNECT localhost:{port}`: a byte tunnel from the runner to a port inside the sandbox (previews).

The sandbox has no host ports and its network namespace is its own: the daemon is the only thing the host
reaches, over its unix socket. A preview request is therefore carried as raw bytes: the runner sends
`CONNECT localhost:{port}`, the daemon connects to that port on the sandbox's loopback (as the sandbox
user, from inside its network namespace, so it reaches exactly what the sandbox itself reaches on
loopback and nothing else), answers `200 Connection Established` and splices both directions until either
side closes. Only loopback targets are accepted. CONNECT is not a toolbox route: the proxy and the runner
never forward it from a user (tidepool_contracts.toolbox_routes); the runner sends it itself.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading

CONNECT_TIMEOUT_SECONDS = 5.0
_CHUNK = 64 * 1024
_TARGET = re.compile(r"^(?:localhost|127\.0\.0\.1|\[::1\]):(\d{1,5})$")


def parse_target(authority: str) -> int | None:
    """The port of a loopback CONNECT target, None for anything else."""
    match = _TARGET.match(authority.strip())
    if match is None:
        return None
    port = int(match.group(1))
    return port if 1 <= port <= 65535 else None


def open_loopback(port: int) -> socket.socket:
    """A connection to `port` on the sandbox's loopback: IPv4 first, then IPv6 (servers bound to ::1)."""
    errors: list[OSError] = []
    for family, address in ((socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port))):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_SECONDS)
            sock.connect(address)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as error:
            sock.close()
            errors.append(error)
    raise errors[0]


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until `source` ends, then half-close `sink` so the other side sees the end too."""
    try:
        while True:
            chunk = source.recv(_CHUNK)
            if not chunk:
                break
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def splice(client: socket.socket, leftover: bytes, upstream: socket.socket) -> None:
    """Relay bytes both ways until both directions ended (the calling thread carries upstream -> client)."""
    try:
        if leftover:
            upstream.sendall(leftover)
        forward = threading.Thread(target=_pump, args=(client, upstream), name="port-forward", daemon=True)
        forward.start()
        _pump(upstream, client)
        forward.join()
    except OSError:
        pass
    finally:
        upstream.close()
