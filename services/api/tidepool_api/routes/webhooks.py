"""`/webhooks/endpoints`: an organization's webhook endpoints and their delivery log (README "Webhooks").

Daytona manages endpoints in Svix's portal (its SDK has no endpoint calls), so these routes are Tidepool's.
An endpoint receives every event of its organization and its secret signs them: managing and reading them
needs a full-access key (Daytona: organization owners, or members given the permission). Another
organization's endpoint is 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from tidepool_api import webhooks
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Context, FullAccess
from tidepool_api.schemas import (
    CreatedWebhookEndpointDto,
    CreateWebhookEndpointRequest,
    UpdateWebhookEndpointRequest,
    WebhookAttemptDto,
    WebhookDeliveryDto,
    WebhookEndpointDto,
    WebhookSecretDto,
    error_responses,
    webhook_attempt_dto,
    webhook_delivery_dto,
    webhook_endpoint_dto,
)

router = APIRouter(prefix="/webhooks/endpoints", tags=["webhooks"], responses=error_responses(401))
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.get("", response_model=list[WebhookEndpointDto])
async def list_webhook_endpoints(context: Context, caller: FullAccess) -> JsonResponse:
    endpoints = await webhooks.list_endpoints(context, caller.organization_id)
    return JsonResponse([webhook_endpoint_dto(endpoint) for endpoint in endpoints])


@router.post("", status_code=201, response_model=CreatedWebhookEndpointDto, responses=error_responses(400))
async def create_webhook_endpoint(
    context: Context, caller: FullAccess, request: CreateWebhookEndpointRequest
) -> JsonResponse:
    endpoint, secret = await webhooks.create_endpoint(
        context,
        caller.organization_id,
        request.url,
        request.event_types,
        request.enabled,
        request.description,
    )
    return JsonResponse({**webhook_endpoint_dto(endpoint), "secret": secret}, status_code=201)


@router.get("/{endpoint_id}", response_model=WebhookEndpointDto, responses=error_responses(404))
async def get_webhook_endpoint(context: Context, caller: FullAccess, endpoint_id: str) -> JsonResponse:
    endpoint = await webhooks.get_endpoint(context, caller.organization_id, endpoint_id)
    return JsonResponse(webhook_endpoint_dto(endpoint))


@router.patch("/{endpoint_id}", response_model=WebhookEndpointDto, responses=error_responses(400, 404))
async def update_webhook_endpoint(
    context: Context, caller: FullAccess, endpoint_id: str, request: UpdateWebhookEndpointRequest
) -> JsonResponse:
    endpoint = await webhooks.update_endpoint(
        context, caller.organization_id, endpoint_id, request.model_dump(exclude_none=True)
    )
    return JsonResponse(webhook_endpoint_dto(endpoint))


@router.delete("/{endpoint_id}", status_code=204, responses=error_responses(404))
async def delete_webhook_endpoint(context: Context, caller: FullAccess, endpoint_id: str) -> Response:
    await webhooks.delete_endpoint(context, caller.organization_id, endpoint_id)
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate-secret", response_model=WebhookSecretDto, responses=error_responses(404))
async def rotate_webhook_secret(context: Context, caller: FullAccess, endpoint_id: str) -> JsonResponse:
    secret = await webhooks.rotate_secret(context, caller.organization_id, endpoint_id)
    return JsonResponse({"secret": secret})


@router.get("/{endpoint_id}/attempts", response_model=list[WebhookAttemptDto], responses=error_responses(404))
async def list_webhook_attempts(
    context: Context, caller: FullAccess, endpoint_id: str, limit: Limit = 100
) -> JsonResponse:
    attempts = await webhooks.list_attempts(context, caller.organization_id, endpoint_id, limit)
    return JsonResponse([webhook_attempt_dto(attempt) for attempt in attempts])


@router.get(
    "/{endpoint_id}/deliveries", response_model=list[WebhookDeliveryDto], responses=error_responses(404)
)
async def list_webhook_deliveries(
    context: Context, caller: FullAccess, endpoint_id: str, limit: Limit = 100
) -> JsonResponse:
    deliveries = await webhooks.list_deliveries(context, caller.organization_id, endpoint_id, limit)
    return JsonResponse([webhook_delivery_dto(delivery) for delivery in deliveries])
