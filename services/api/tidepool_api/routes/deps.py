"""Request dependencies: the API context, the authenticated principal, and the scope a route needs.

A route declares what a key must hold in its signature, so the rule sits beside the handler and
`tests/unit/api/test_route_permissions.py` can read it off every route:

    caller: Caller                                     # any valid key of the organization (reads)
    caller: Annotated[Principal, Requires(Permission.WRITE_VOLUMES)]
    caller: Annotated[Principal, Requires(Permission.A, Permission.B, any_of=True)]   # one of them
    caller: SandboxWriter                              # the usual ones have names, below

A key without the scope gets 403 naming what is missing. The check needs no resource, so it cannot reveal
whether another organization's resource exists: a key *with* the scope still gets 404 for those.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from tidepool_api.auth import Principal
from tidepool_api.context import ApiContext
from tidepool_api.errors import ApiError
from tidepool_api.ratelimit import STATE_KEY
from tidepool_api.schemas import error_responses
from tidepool_contracts.permissions import Permission, missing


def get_context(request: Request) -> ApiContext:
    return request.app.state.context


async def get_principal(request: Request) -> Principal:
    context: ApiContext = request.app.state.context
    principal = await context.authenticator.authenticate(request)
    # Throttled before the audit record and the handler: a refused request does nothing (ratelimit.py).
    limiter = getattr(context, "rate_limiter", None)  # absent in unit tests' stand-in contexts
    if limiter is not None:
        headers = await limiter.hit(principal, request.method, request.url.path)
        setattr(request.state, STATE_KEY, headers)
    # A write is recorded (tidepool_api.audit) before its handler runs: no write goes unaudited.
    trail = getattr(request.state, "audit", None)
    if trail is not None:
        await trail.begin(request, principal)
    return principal


class PermissionCheck:
    """The dependency behind `Requires`: authenticates, then checks the key's scopes."""

    def __init__(self, permissions: tuple[Permission, ...], any_of: bool) -> None:
        self.permissions = tuple(Permission(permission).value for permission in permissions)
        self.any_of = any_of

    def allows(self, granted: frozenset[str]) -> bool:
        lacking = missing(granted, self.permissions)
        return len(lacking) < len(self.permissions) if self.any_of else not lacking

    async def __call__(self, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not self.allows(principal.permissions):
            wanted = (
                " or ".join(self.permissions)
                if self.any_of
                else ", ".join(missing(principal.permissions, self.permissions))
            )
            raise ApiError(403, f"API key '{principal.key_name}' lacks the required permission: {wanted}")
        return principal


def Requires(*permissions: Permission, any_of: bool = False) -> Any:
    """`Annotated[Principal, Requires(...)]`: the caller, once its key holds `permissions` (all, or one
    of them with `any_of`)."""
    if not permissions:
        raise ValueError("Requires() needs at least one permission; use Caller for reads")
    return Depends(PermissionCheck(permissions, any_of))


Context = Annotated[ApiContext, Depends(get_context)]
Caller = Annotated[Principal, Depends(get_principal)]
# The usual scopes, named once.
SandboxWriter = Annotated[Principal, Requires(Permission.WRITE_SANDBOXES)]
SandboxDeleter = Annotated[Principal, Requires(Permission.DELETE_SANDBOXES)]
SnapshotWriter = Annotated[Principal, Requires(Permission.WRITE_SNAPSHOTS)]
SnapshotDeleter = Annotated[Principal, Requires(Permission.DELETE_SNAPSHOTS)]
RegistryWriter = Annotated[Principal, Requires(Permission.WRITE_REGISTRIES)]
RegistryDeleter = Annotated[Principal, Requires(Permission.DELETE_REGISTRIES)]
# A snapshot of a sandbox's filesystem: it reads the sandbox and makes a snapshot of the organization.
SandboxSnapshotWriter = Annotated[Principal, Requires(Permission.WRITE_SANDBOXES, Permission.WRITE_SNAPSHOTS)]
VolumeReader = Annotated[Principal, Requires(Permission.READ_VOLUMES)]
VolumeWriter = Annotated[Principal, Requires(Permission.WRITE_VOLUMES)]
VolumeDeleter = Annotated[Principal, Requires(Permission.DELETE_VOLUMES)]
# Managing organizations mints full-access keys: only a key that holds every scope may.
FullAccess = Annotated[Principal, Requires(*Permission)]
# Uploading a build context serves a sandbox made from an `Image` as well as a snapshot build.
BuildContextWriter = Annotated[
    Principal, Requires(Permission.WRITE_SANDBOXES, Permission.WRITE_SNAPSHOTS, any_of=True)
]


def permission_checks(route: APIRoute) -> list[PermissionCheck]:
    """The scope checks among a route's dependencies (at any depth)."""
    found: list[PermissionCheck] = []
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if isinstance(dependant.call, PermissionCheck):
            found.append(dependant.call)
        pending.extend(dependant.dependencies)
    return found


def api_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """Every API route with its full path, through included routers (FastAPI includes them lazily)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
            continue
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from api_routes(original.routes, prefix + route.include_context.prefix)


def document_permissions(app: FastAPI) -> None:
    """Put each route's scope into `/api/openapi.json`: a 403 response and a line of its description.

    Called once the routers are included, so a new route only declares `Requires(...)` in its signature."""
    for _, route in api_routes(app.routes):
        checks = permission_checks(route)
        if not checks:
            continue
        route.responses.setdefault(403, error_responses(403)[403])
        needs = "; ".join((" or " if check.any_of else ", ").join(check.permissions) for check in checks)
        line = f"API key permission: {needs}"
        route.description = f"{route.description}\n\n{line}" if route.description else line
