"""The audit log: every authenticated write of the API (POST, PUT, PATCH, DELETE), with its outcome.

As Daytona's audit interceptor, fail-closed: the record is written once the key is known and before the
handler runs (if it cannot be written the request fails, 503), then completed with the status code, the
error message and the id of what was created. `AuditMiddleware` opens a trail for each write;
`routes.deps.get_principal` writes the record as soon as it knows the key; nothing per route is needed:

- `targetType` is the first path segment (`sandbox`, `snapshots` -> `snapshot`, `docker-registry` ->
  `docker_registry`, `api-keys` -> `api_key`, `volumes` -> `volume`, ...),
- `targetId` the first path parameter, or for a create the `id` (else `name`) of the JSON answer,
- `action` `create` / `update` / `delete` for the resource itself, else the literal segments after it
  (`start`, `stop`, `labels`, `autostop`, `signing_key_rotate`, ...).

Reads are not recorded (as in Daytona), nor are toolbox calls (they go through the proxy).
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidepool_api.auth import Principal
from tidepool_api.db import AuditLog, Database
from tidepool_api.errors import ApiError

log = structlog.get_logger("tidepool.api.audit")
AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TARGET_TYPES = {
    "sandbox": "sandbox",
    "snapshots": "snapshot",
    "docker-registry": "docker_registry",
    "api-keys": "api_key",
    "organizations": "organization",
    "volumes": "volume",
    "object-storage": "object_storage",
    "webhook-endpoints": "webhook_endpoint",
    "runners": "runner",
}
MAX_CAPTURED_BODY = 64 * 1024  # enough for any DTO naming what was created
TEXT_MAX = 1024


def describe(method: str, path: str, path_params: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(action, targetType, targetId) of a write, from its URL alone."""
    segments = [segment for segment in path.split("/") if segment]
    if segments and segments[0] == "api":
        segments = segments[1:]
    if not segments:
        return method.lower(), None, None
    if segments[:2] == ["webhooks", "endpoints"]:
        segments = ["webhook-endpoints", *segments[2:]]  # an endpoint is the target, not `webhooks`
    target_type = TARGET_TYPES.get(segments[0], segments[0].replace("-", "_"))
    target_id = next((str(value) for value in path_params.values()), None)
    # What follows the target, but the target's id and numbers (`/sandbox/{id}/autostop/{minutes}`).
    literals = [
        segment.replace("-", "_")
        for segment in segments[1:]
        if segment != target_id and not segment.lstrip("-").isdigit()
    ]
    if literals and method == "POST":
        action = "_".join(literals)
    elif method == "DELETE":
        action = "delete"
    elif method == "POST":
        action = "create"
    elif method == "PATCH" and literals:
        action = "update_" + "_".join(literals)  # Daytona's `update_quota`
    else:
        action = "_".join(literals) if literals else "update"
    return action, target_type, target_id


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


class AuditTrail:
    """One write request's audit record: begun when the key is known, finished with the answer."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.record_id: str | None = None

    async def begin(self, request: Request, principal: Principal) -> None:
        if self.record_id is not None:
            return
        action, target_type, target_id = describe(request.method, request.url.path, request.path_params)
        record = AuditLog(
            id=str(uuid.uuid4()),
            organization_id=principal.organization_id,
            actor_id=principal.key_id,
            actor_api_key_prefix=principal.key_prefix or None,
            action=action,
            target_type=target_type,
            target_id=target_id,
            ip_address=client_ip(request),
            user_agent=(request.headers.get("user-agent") or "")[:TEXT_MAX] or None,
            source=(request.headers.get("x-daytona-source") or "")[:TEXT_MAX] or None,
            detail={"method": request.method, "path": request.url.path[:TEXT_MAX]},
        )
        try:
            async with self.database.sessions() as session:
                session.add(record)
                await session.commit()
        except Exception as error:
            log.error("audit.write_failed", error=str(error))
            raise ApiError(503, "the audit log is unavailable; the request was not carried out") from error
        self.record_id = record.id

    async def finish(self, status: int, body: bytes) -> None:
        if self.record_id is None:
            return
        answer: Any = None
        try:
            answer = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            answer = None
        try:
            async with self.database.sessions() as session:
                record = await session.get(AuditLog, self.record_id)
                if record is None:
                    return
                record.status_code = status
                if status >= 400 and isinstance(answer, dict):
                    # PostgreSQL text holds no NUL: a message echoing a client's bytes must still be recorded.
                    message = str(answer.get("message", "")).replace("\x00", "\\x00")
                    record.error_message = message[:TEXT_MAX] or None
                if record.target_id is None and status < 400 and isinstance(answer, dict):
                    created = answer.get("id") or answer.get("name")
                    record.target_id = str(created).replace("\x00", "\\x00")[:TEXT_MAX] if created else None
                session.add(record)
                await session.commit()
        except Exception as error:  # the request is done; the record stays, without its outcome
            log.warning("audit.finish_failed", record_id=self.record_id, error=str(error))


class AuditMiddleware:
    """Opens an `AuditTrail` for each write under /api and completes it with the response."""

    def __init__(self, app: ASGIApp, database_of: Any) -> None:
        self.app = app
        self.database_of = database_of  # () -> Database, read at request time

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in AUDITED_METHODS:
            await self.app(scope, receive, send)
            return
        trail = AuditTrail(self.database_of())
        scope.setdefault("state", {})["audit"] = trail
        status = 500
        captured = bytearray()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(captured) < MAX_CAPTURED_BODY:
                captured.extend(message.get("body", b"")[: MAX_CAPTURED_BODY - len(captured)])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            await trail.finish(status, bytes(captured))
