"""Live sandbox events over Socket.IO at `/api/socket.io/` (SDK wire contract §1.7), so the SDK stops polling.

- Connect: Engine.IO 4 (the SDK uses the websocket transport only); the CONNECT packet's `auth` is
  `{"token": "<API key>"}`. A missing, unknown, revoked or expired key is refused; an accepted socket joins
  its organization's room and receives that organization's events only.
- Events, emitted once the database change is committed:
  - `sandbox.created`: the full Sandbox DTO (as `GET /api/sandbox/{id}` answers).
  - `sandbox.state.updated`: `{"sandbox": <Sandbox DTO>, "oldState": str, "newState": str}`, plus
    `"cause"` when the platform changed it on its own (`auto_stop`, `auto_delete`). Not for `error` and
    `build_failed`: the SDK takes only the state from an event and would report the failure without its
    reason; its poll (every second while it is connected) reads the reason instead.
- Every state write goes through `sandboxes.transition` (the one checked write path), which records the
  event on the database session (`record_state_change`); the session's commit hook emits what the committed
  transaction contained, and nothing of a rolled-back one.

Several API processes: each emits what it commits; a client connected to one replica sees the changes that
replica applied (on one machine there is one API process).
"""

from __future__ import annotations

import asyncio
from typing import Any

import socketio
import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session

from tidepool_api.auth import Authenticator
from tidepool_api.db import Sandbox
from tidepool_api.errors import ApiError
from tidepool_api.schemas import sandbox_dto
from tidepool_contracts.states import FAILED_STATES

log = structlog.get_logger("tidepool.api.live_events")

SOCKET_IO_PATH = "/api/socket.io"
FAILED_STATE_VALUES = frozenset(state.value for state in FAILED_STATES)
SANDBOX_CREATED = "sandbox.created"
SANDBOX_STATE_UPDATED = "sandbox.state.updated"
# Keys of SQLAlchemy `Session.info`: the LiveEvents of this process, and what the open transaction recorded.
SESSION_LIVE = "tidepool.live_events"
SESSION_PENDING = "tidepool.live_events.pending"


def organization_room(organization_id: str) -> str:
    return f"organization:{organization_id}"


class LiveEvents:
    """The Socket.IO server and the events it emits (see the module docstring)."""

    def __init__(self, authenticator: Authenticator, toolbox_proxy_url: str) -> None:
        self.authenticator = authenticator
        self.toolbox_proxy_url = toolbox_proxy_url
        # No cross-origin browser pages: the SDK sends no Origin header, which is always accepted.
        self.server = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=[], logger=False)
        self.server.on("connect", self._connect)
        self._tasks: set[asyncio.Task[None]] = set()

    def asgi_app(self, other_app: Any) -> socketio.ASGIApp:
        """`other_app` (the REST API) with Socket.IO answering under SOCKET_IO_PATH."""
        return socketio.ASGIApp(self.server, other_asgi_app=other_app, socketio_path=SOCKET_IO_PATH)

    async def _connect(self, sid: str, environ: dict[str, Any], auth: object) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise socketio.exceptions.ConnectionRefusedError("missing token: set DAYTONA_API_KEY")
        try:
            principal = await self.authenticator.authenticate_token(token.strip())
        except ApiError as error:
            raise socketio.exceptions.ConnectionRefusedError(error.message) from None
        await self.server.enter_room(sid, organization_room(principal.organization_id))

    def describe(self, sandbox: Sandbox) -> dict[str, object]:
        return sandbox_dto(sandbox, self.toolbox_proxy_url)

    def emit_later(self, pending: list[tuple[str, str, dict[str, object]]]) -> None:
        """Emit (event, organization, payload) items from a commit hook (synchronous, on the loop)."""
        task = asyncio.get_running_loop().create_task(self._emit(pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emit(self, pending: list[tuple[str, str, dict[str, object]]]) -> None:
        for name, organization_id, payload in pending:
            try:
                await self.server.emit(name, payload, room=organization_room(organization_id))
            except Exception:
                log.warning("live_events.emit_failed", event=name, exc_info=True)


def _pending(session: Session) -> list[tuple[str, str, dict[str, object]]] | None:
    live = session.info.get(SESSION_LIVE)
    if live is None:
        return None
    return session.info.setdefault(SESSION_PENDING, [])


def record_created(session: Any, sandbox: Sandbox) -> None:
    """Queue `sandbox.created` on the (async or sync) session; emitted when it commits."""
    sync_session = getattr(session, "sync_session", session)
    pending = _pending(sync_session)
    if pending is not None:
        live: LiveEvents = sync_session.info[SESSION_LIVE]
        pending.append((SANDBOX_CREATED, sandbox.organization_id, live.describe(sandbox)))


def record_state_change(
    session: Any, sandbox: Sandbox, old_state: str, new_state: str, cause: str | None = None
) -> None:
    """Queue `sandbox.state.updated` (the sandbox as it is after the change); emitted when it commits. With a
    `cause` (the platform acted on its own, e.g. `auto_stop`), the payload says so (an extra key)."""
    sync_session = getattr(session, "sync_session", session)
    pending = _pending(sync_session)
    if new_state in FAILED_STATE_VALUES:
        # The SDK applies only the state of an event and would then raise with the reason it last saw
        # (none): a failure is left to its poll (every second while connected), which reads the reason.
        return
    if pending is not None and old_state != new_state:
        live: LiveEvents = sync_session.info[SESSION_LIVE]
        payload: dict[str, object] = {
            "sandbox": live.describe(sandbox),
            "oldState": old_state,
            "newState": new_state,
        }
        if cause:
            payload["cause"] = cause
        pending.append((SANDBOX_STATE_UPDATED, sandbox.organization_id, payload))


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending = session.info.pop(SESSION_PENDING, None)
    live = session.info.get(SESSION_LIVE)
    if pending and live is not None:
        live.emit_later(pending)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(SESSION_PENDING, None)
