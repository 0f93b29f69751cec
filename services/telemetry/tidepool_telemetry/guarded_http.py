"""An HTTP client (requests, as the OTLP/HTTP exporter uses) for tenants' OTLP endpoints that checks the
address of each connection before anything is sent on it (tidepool_runtime.netguard): a name that resolved
to a public address when the endpoint was saved and resolves inside the operator's network now (DNS
rebinding) gets no request. A connection through an HTTP proxy from the environment is the proxy's to judge.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

from tidepool_runtime import netguard


def _checked(connection: HTTPConnection, sock: socket.socket, allowed: Sequence[netguard.IPNetwork]) -> None:
    reason = netguard.refusal(str(sock.getpeername()[0]), allowed)
    if reason is not None:
        sock.close()
        raise NewConnectionError(connection, f"refused to connect: {reason}")


def _pools(allowed: Sequence[netguard.IPNetwork]) -> dict[str, type[HTTPConnectionPool]]:
    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _checked(self, sock, allowed)
            return sock

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _checked(self, sock, allowed)
            return sock

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, allowed: Sequence[netguard.IPNetwork]) -> None:
        self._allowed = tuple(allowed)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pools(self._allowed)


def guarded_session(allowed: Sequence[netguard.IPNetwork] = ()) -> requests.Session:
    """A requests Session whose direct connections reach public addresses and `allowed` only; a refused
    one raises requests' ConnectionError (the exporter reports a failed export)."""
    session = requests.Session()
    adapter = _GuardedAdapter(allowed)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
