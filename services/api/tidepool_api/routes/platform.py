"""Client configuration and health."""

from __future__ import annotations

from fastapi import APIRouter

from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Context
from tidepool_api.schemas import ConfigDto, HealthDto

router = APIRouter()


@router.get("/health", response_model=HealthDto)
async def health() -> JsonResponse:
    return JsonResponse({"status": "ok"})


@router.get("/config", response_model=ConfigDto)
async def client_config(context: Context) -> JsonResponse:
    settings = context.settings
    return JsonResponse(
        {
            "version": "0.1.0",
            "oidc": {"issuer": "", "clientId": "", "audience": "", "provider": "none"},
            "linkedAccountsEnabled": False,
            "announcements": {},
            "proxyTemplateUrl": "",
            "proxyToolboxUrl": settings.toolbox_proxy_url,
            "defaultSnapshot": settings.default_snapshot,
            "dashboardUrl": "",
            "maxAutoArchiveInterval": 43200,
            "maintananceMode": False,
            "environment": "self-hosted",
        }
    )
