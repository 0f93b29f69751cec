"""Process sessions (`/process/session…`): the routes over `session_shell.Session`, one persistent shell per
session with commands run inside it (see `session_shell.py` for how a command runs). The image's own
entrypoint, when it has one, runs in the `entrypoint` session.
"""

from __future__ import annotations

import logging
import shlex
import threading
from typing import Any

from ..context import DaemonContext
from ..errors import DaemonError, bad_request
from ..httpd.http_io import Request, Response, empty_response, json_response
from ..httpd.websocket import CLOSE_NORMAL, WebSocket, is_websocket_request, websocket_upgrade
from .session_shell import STDERR_MARKER, Session, SessionCommand, not_found, split_log

logger = logging.getLogger("tidepool_daemon.sessions")

ENTRYPOINT_SESSION_ID = "entrypoint"
MAX_SESSION_ID_LENGTH = 256


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class SessionService:
    """The `/process/session…` routes."""

    def __init__(self, context: DaemonContext) -> None:
        self._context = context
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._entrypoint: Session | None = None
        self._entrypoint_command: SessionCommand | None = None
        # Why the image's entrypoint did not run (no shell to run it): the entrypoint session's log says so.
        self._entrypoint_error = ""
        if context.entrypoint:
            # Like upstream: the image's own entrypoint runs in a session whose logs the SDK can read.
            self._entrypoint = Session(ENTRYPOINT_SESSION_ID, context)
            try:
                self._entrypoint_command = self._entrypoint.submit(shlex.join(context.entrypoint), True)
            except DaemonError as error:  # an image without a shell: the toolbox still serves the rest
                logger.error("the image's entrypoint cannot run: %s", error.message)
                self._entrypoint_error = (
                    f"the image's entrypoint {shlex.join(context.entrypoint)} did not run: {error.message}\n"
                )

    def _session(self, request: Request) -> Session:
        session_id = request.path_params["sessionId"]
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise not_found(f"session {session_id} not found")
        return session

    # POST /process/session
    def create_session(self, request: Request) -> Response:
        payload = request.json_object_body()
        session_id = payload.get("sessionId")
        if not isinstance(session_id, str) or not session_id.strip():
            raise bad_request("sessionId is required")
        if len(session_id) > MAX_SESSION_ID_LENGTH or "/" in session_id or "\x00" in session_id:
            raise bad_request("sessionId must be at most 256 characters without '/'")
        with self._lock:
            if session_id in self._sessions:
                raise DaemonError(409, f"session {session_id} already exists", "CONFLICT")
            self._sessions[session_id] = Session(session_id, self._context)
        return empty_response(201)

    # GET /process/session
    def list_sessions(self, request: Request) -> Response:
        with self._lock:
            sessions = list(self._sessions.values())
        return json_response(200, [session.as_dict() for session in sessions])

    # GET /process/session/{sessionId}
    def get_session(self, request: Request) -> Response:
        return json_response(200, self._session(request).as_dict())

    # DELETE /process/session/{sessionId}
    def delete_session(self, request: Request) -> Response:
        session_id = request.path_params["sessionId"]
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise not_found(f"session {session_id} not found")
        session.close()
        return empty_response(204)

    # POST /process/session/{sessionId}/exec
    def execute(self, request: Request) -> Response:
        session = self._session(request)
        payload = request.json_object_body()
        command_text = payload.get("command")
        if not isinstance(command_text, str) or not command_text.strip():
            raise bad_request("command is required")
        run_async = _optional_bool(payload, "runAsync") or _optional_bool(payload, "async")
        suppress_echo = _optional_bool(payload, "suppressInputEcho")
        command = session.submit(command_text, suppress_echo, interactive=run_async)
        if run_async:
            return json_response(202, {"cmdId": command.id})
        session.wait_complete(command)
        output, stdout, stderr = split_log(session.read_log(command))
        response: dict[str, Any] = {
            "cmdId": command.id,
            "output": _text(output),
            "stdout": _text(stdout),
            "stderr": _text(stderr),
            "exitCode": command.exit_code,
        }
        if command.termination is not None:
            response["termination"] = command.termination.as_dict()
        return json_response(200, response)

    # GET /process/session/{sessionId}/command/{commandId}
    def get_command(self, request: Request) -> Response:
        session = self._session(request)
        return json_response(200, session.command(request.path_params["commandId"]).as_dict())

    # GET /process/session/{sessionId}/command/{commandId}/logs[?follow=true[&offset=N]]
    def command_logs(self, request: Request) -> Response:
        session = self._session(request)
        command = session.command(request.path_params["commandId"])
        if is_websocket_request(request):
            follow = (request.query_value("follow") or "").lower() == "true"
            offset = _parse_offset(request.query_value("offset"))
            return websocket_upgrade(request, lambda ws: session.follow(command, ws, offset, follow))
        output, stdout, stderr = split_log(session.read_log(command))
        return json_response(200, {"output": _text(output), "stdout": _text(stdout), "stderr": _text(stderr)})

    # POST /process/session/{sessionId}/command/{commandId}/input
    def send_input(self, request: Request) -> Response:
        session = self._session(request)
        command = session.command(request.path_params["commandId"])
        payload = request.json_object_body()
        data = payload.get("data")
        if not isinstance(data, str):
            raise bad_request("data is required and must be a string")
        session.send_input(command, data)
        return empty_response(204)

    # GET /process/session/entrypoint
    def entrypoint_session(self, request: Request) -> Response:
        if self._entrypoint is None:
            return json_response(200, {"sessionId": ENTRYPOINT_SESSION_ID, "commands": []})
        return json_response(200, self._entrypoint.as_dict())

    # GET /process/session/entrypoint/logs[?follow=true]
    def entrypoint_logs(self, request: Request) -> Response:
        session, command = self._entrypoint, self._entrypoint_command
        if session is None or command is None:
            error = self._entrypoint_error
            if is_websocket_request(request):
                return websocket_upgrade(request, lambda ws: _send_and_close(ws, error))
            return json_response(200, {"output": error, "stdout": "", "stderr": error})
        if is_websocket_request(request):
            follow = (request.query_value("follow") or "").lower() == "true"
            offset = _parse_offset(request.query_value("offset"))
            return websocket_upgrade(request, lambda ws: session.follow(command, ws, offset, follow))
        output, stdout, stderr = split_log(session.read_log(command))
        return json_response(200, {"output": _text(output), "stdout": _text(stdout), "stderr": _text(stderr)})

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()


def _send_and_close(ws: WebSocket, text: str) -> None:
    if text:
        ws.send_bytes(STDERR_MARKER + text.encode())  # the SDK's demultiplexer: stderr
    ws.close(CLOSE_NORMAL)


def _optional_bool(payload: dict[str, Any], name: str) -> bool:
    value = payload.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean")
    return value


def _parse_offset(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if not raw.isdigit():
        raise bad_request("offset must be a non-negative integer")
    return int(raw)
