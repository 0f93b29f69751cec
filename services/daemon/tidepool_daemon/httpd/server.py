"""HTTP/1.1 server (keep-alive, one thread per connection) on a unix socket.

This is what the worker (`worker.serve`) runs on the listener inherited from the supervisor
(`supervisor.py`); it knows no route itself: `routes.build_router` gives it the route table. The host-side
runner reaches it through the bind-mounted unix socket; `--tcp` exists only for local debugging. Process
reaping is left to the container's init process (see `process/execute.py`).

A route may answer with `websocket.WebSocketUpgrade` (built by `websocket.websocket_upgrade`): the handler
thread then writes the 101 response and runs the route's `on_open` on that same connection, which is never
used for HTTP again (no keep-alive after an upgrade). See `websocket.py` for the API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import DAEMON_VERSION
from ..errors import DaemonError, envelope_for
from ..supervisor import LISTEN_BACKLOG, bind_unix_listener
from .http_io import (
    BodyFramingError,
    EmptyBody,
    Request,
    RequestBody,
    Response,
    body_for_request,
    encode_json,
)
from .routing import Router
from .websocket import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    WebSocket,
    WebSocketUpgrade,
    encode_message,
    take_buffered_bytes,
)

logger = logging.getLogger("tidepool_daemon")


# The handling time of a traced request, `start=<unix ns>;end=<unix ns>` (until the response head is
# written); the runner turns it into the daemon's span and drops it (tidepool_contracts.toolbox_routes).
DAEMON_SPAN_HEADER = "X-Tidepool-Daemon-Span"


class ToolboxRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK pools connections
    server_version = f"tidepool-daemon/{DAEMON_VERSION}"
    sys_version = ""
    server: ToolboxServerMixin

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def do_CONNECT(self) -> None:
        """A tunnel to a port on the sandbox's loopback, for previews (see ../port_forward.py)."""
        from ..port_forward import open_loopback, parse_target, splice

        self.close_connection = True
        port = parse_target(self.path)
        if port is None:
            self._write_response(self._error_response(DaemonError(400, "CONNECT only to localhost:PORT"), ""))
            return
        try:
            upstream = open_loopback(port)
        except OSError as error:
            message = f"nothing answers on port {port} in the sandbox ({error.strerror or error})"
            self._write_response(self._error_response(DaemonError(502, message), ""))
            return
        try:
            self.connection.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        except OSError:
            upstream.close()
            return
        self.log_request(200)
        splice(self.connection, take_buffered_bytes(self.connection, self.rfile), upstream)

    def _handle(self) -> None:
        # A traced request (the runner sent `traceparent`) gets its handling time back in a header: the
        # daemon exports nothing itself (it has no dependencies); the runner records it as the daemon's span.
        started_ns = time.time_ns() if "traceparent" in self.headers else 0
        split = urlsplit(self.path)
        route_path = split.path or "/"
        body: RequestBody = EmptyBody()
        try:
            body = body_for_request(self.headers, self.rfile)
            handler, path_params = self.server.router.resolve(self.command, route_path)
            query = parse_qs(split.query, keep_blank_values=True)
            request = Request(self.command, route_path, query, self.headers, body, path_params)
            response = handler(request)
        except BodyFramingError as exc:
            self.close_connection = True  # we no longer know where the next request starts
            response = self._error_response(exc, route_path)
        except DaemonError as exc:
            response = self._error_response(exc, route_path)
        except Exception:
            logger.exception("unhandled error in %s %s", self.command, route_path)
            response = self._error_response(DaemonError(500, "internal server error"), route_path)
        if not body.settle():
            self.close_connection = True
        if isinstance(response, WebSocketUpgrade):
            self._run_websocket(response)
            return
        if started_ns:
            timing = f"start={started_ns};end={time.time_ns()}"
            response = Response(
                response.status,
                [*response.headers, (DAEMON_SPAN_HEADER, timing)],
                response.body,
                response.content_length,
            )
        self._write_response(response)

    def _run_websocket(self, upgrade: WebSocketUpgrade) -> None:
        """Answer 101, then hand the connection to the route's `on_open`; never reused for HTTP again."""
        self.close_connection = True
        # Written by hand in one piece: the greeting frame must travel with the 101 (see websocket.py).
        lines = [
            f"{self.protocol_version} 101 Switching Protocols",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            *(f"{name}: {value}" for name, value in upgrade.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        greeting = b"" if upgrade.greeting is None else encode_message(upgrade.greeting)
        try:
            self.connection.sendall(head + greeting)
        except OSError:
            return
        self.log_request(101)
        leftover = take_buffered_bytes(self.connection, self.rfile)
        websocket = WebSocket(self.connection, leftover, upgrade.protocol, upgrade.max_message_bytes)
        close_code, close_reason = CLOSE_NORMAL, ""
        try:
            if upgrade.on_open is not None:
                upgrade.on_open(websocket)
        except Exception:
            logger.exception("websocket handler failed for %s", self.path)
            close_code, close_reason = CLOSE_INTERNAL_ERROR, "internal server error"
        finally:
            websocket.close(close_code, close_reason)

    def _error_response(self, error: DaemonError, route_path: str) -> Response:
        payload = encode_json(envelope_for(error, route_path, self.command or ""))
        return Response(error.status, [("Content-Type", "application/json")], payload)

    def _write_response(self, response: Response) -> None:
        body_allowed = self.command != "HEAD" and response.status not in (204, 304)
        try:
            self.send_response(response.status)
            for name, value in response.headers:
                self.send_header(name, value)
            if isinstance(response.body, bytes):
                if response.status not in (204, 304):
                    self.send_header("Content-Length", str(len(response.body)))
            elif response.content_length is not None:
                self.send_header("Content-Length", str(response.content_length))
            else:
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if isinstance(response.body, bytes):
                if body_allowed and response.body:
                    self.wfile.write(response.body)
            elif body_allowed:
                self._write_stream(response)
        except OSError:
            self.close_connection = True  # the client went away mid-response
        finally:
            close = getattr(response.body, "close", None)
            if close is not None:
                close()  # release files held by an unfinished streaming generator

    def _write_stream(self, response: Response) -> None:
        chunked = response.content_length is None
        sent = 0
        try:
            for chunk in response.body:
                if not chunk:
                    continue
                self.wfile.write(b"%X\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
        except OSError:
            raise
        except Exception:
            # Headers are already out, so the only honest signal left is an unterminated body.
            logger.exception("error while streaming %s %s", self.command, self.path)
            self.close_connection = True
            return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        elif sent != response.content_length:
            logger.warning(
                "short response body for %s (%d of %d bytes)", self.path, sent, response.content_length
            )
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own protocol errors (bad request line, unknown method) get the JSON envelope too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        route_path = urlsplit(getattr(self, "path", "") or "").path
        method = getattr(self, "command", None) or ""
        payload = encode_json(envelope_for(DaemonError(code, message or phrase), route_path, method))
        if self.request_version == "HTTP/0.9":
            # Unparseable request lines leave the stdlib in HTTP/0.9 mode, which would drop the status
            # line and headers; no real client speaks 0.9, so answer in HTTP/1.1 form.
            self.request_version = "HTTP/1.1"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(payload)

    def version_string(self) -> str:
        return self.server_version

    def address_string(self) -> str:
        # Unix-socket peers have no address ('' or b''); the stdlib would index into it and crash logging.
        if isinstance(self.client_address, tuple) and self.client_address:
            return str(self.client_address[0])
        return "unix"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        logger.debug('%s "%s" %s', self.address_string(), self.requestline, code)

    def log_error(self, format: str, *args: Any) -> None:
        logger.warning("%s %s", self.address_string(), format % args)

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)


class TcpToolboxRequestHandler(ToolboxRequestHandler):
    disable_nagle_algorithm = True  # TCP only; setting TCP_NODELAY on a unix socket would fail


class ToolboxServerMixin(socketserver.ThreadingMixIn):
    daemon_threads = True  # a hung command must not keep the daemon from exiting
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG
    router: Router

    def adopt_listener(self, listener: socket.socket) -> None:
        """Serve an already listening socket (inherited from the supervisor) instead of binding one."""
        self.socket.close()
        self.socket = listener
        self.server_address = listener.getsockname()


class UnixToolboxServer(ToolboxServerMixin, socketserver.UnixStreamServer):
    """Binds `socket_path` itself (tests, tools), or serves `listener` when one is given (the worker)."""

    def __init__(self, socket_path: str, router: Router, listener: socket.socket | None = None) -> None:
        self.router = router
        self._socket_inode: int | None = None
        super().__init__(socket_path, ToolboxRequestHandler, bind_and_activate=listener is None)
        if listener is not None:
            self.adopt_listener(listener)

    def server_bind(self) -> None:
        socket_path = str(self.server_address)
        self.socket.close()
        self.socket = bind_unix_listener(socket_path)
        self._socket_inode = os.stat(socket_path).st_ino

    def server_activate(self) -> None:
        pass  # bind_unix_listener already listens

    def server_close(self) -> None:
        super().server_close()
        socket_path = str(self.server_address)
        # Only remove a socket this server bound (never the supervisor's), and not one a newer daemon has
        # put in its place.
        with contextlib.suppress(OSError):
            if self._socket_inode is not None and os.stat(socket_path).st_ino == self._socket_inode:
                os.unlink(socket_path)


class TcpToolboxServer(ToolboxServerMixin, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], router: Router, listener: socket.socket | None = None
    ) -> None:
        self.router = router
        super().__init__(address, TcpToolboxRequestHandler, bind_and_activate=listener is None)
        if listener is not None:
            self.adopt_listener(listener)
