"""FastAPI application: the Daytona-compatible REST gateway under /api."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from tidepool_api.audit import AuditMiddleware
from tidepool_api.context import ApiContext
from tidepool_api.errors import install_error_handlers
from tidepool_api.http_limits import BodyLimitMiddleware, NulGuardMiddleware
from tidepool_api.ratelimit import RateLimitHeadersMiddleware
from tidepool_api.responses import JsonResponse
from tidepool_api.routes import (
    api_keys,
    audit,
    organizations,
    platform,
    sandbox,
    snapshots,
    volumes,
    warm_pools,
)
from tidepool_api.routes.deps import document_permissions
from tidepool_api.routes.object_storage import router as object_storage_router
from tidepool_api.routes.previews import router as previews_router
from tidepool_api.routes.registries import router as registries_router
from tidepool_api.routes.runners import router as runners_router
from tidepool_api.routes.signing import router as signing_router
from tidepool_api.routes.ssh_access import router as ssh_access_router
from tidepool_api.routes.telemetry import router as telemetry_router
from tidepool_api.routes.webhooks import router as webhooks_router

# The dashboard's built static files (sources: interfaces/dashboard, rebuilt with `make dashboard`).
DASHBOARD_DIR = Path(__file__).parent / "dashboard"


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="Tidepool API",
        version="0.1.0",
        default_response_class=JsonResponse,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.context = context
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=context.settings.api_max_body_bytes)
    app.add_middleware(NulGuardMiddleware)
    # Opens a trail for each write; the record is written once the key is known (routes.deps.get_principal).
    app.add_middleware(AuditMiddleware, database_of=lambda: context.database)
    # Outermost: the throttler's X-RateLimit-* headers go on every answer, errors included.
    app.add_middleware(RateLimitHeadersMiddleware)
    api = APIRouter(prefix="/api")
    api.include_router(platform.router)
    api.include_router(signing_router)  # before sandbox.router: its POST /{id}/{kind}/{minutes} would match
    api.include_router(previews_router)  # likewise (POST /{id}/public/{isPublic})
    api.include_router(ssh_access_router)  # likewise (GET /ssh-access/validate is not GET /{id})
    api.include_router(telemetry_router)
    api.include_router(sandbox.router)
    api.include_router(organizations.router)
    api.include_router(api_keys.router)
    api.include_router(audit.router)
    api.include_router(snapshots.router)
    api.include_router(volumes.router)
    api.include_router(warm_pools.router)
    api.include_router(object_storage_router)
    api.include_router(registries_router)
    api.include_router(webhooks_router)
    api.include_router(runners_router)
    app.include_router(api)
    document_permissions(app)
    mount_dashboard(app)
    return app


def mount_dashboard(app: FastAPI) -> None:
    """`GET /dashboard/` serves the single-page dashboard (same origin as /api and /api/socket.io, so no
    CORS there; it reaches the toolbox at each sandbox's `toolboxProxyUrl`, which answers CORS). The files
    are public: every call they make carries the user's key."""
    if not (DASHBOARD_DIR / "index.html").is_file():
        return

    async def to_dashboard(_: Request) -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    # A plain Starlette route, not an API route: it needs no key and is no part of the API's contract.
    app.add_route("/dashboard", to_dashboard, include_in_schema=False)
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")
