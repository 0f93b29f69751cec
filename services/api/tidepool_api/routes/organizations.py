"""Organizations; each new one gets a first key with every permission (`routes/api_keys.py`).

Organizations are managed by the admin organization only (`organization.is_admin`, the one `make up`
creates), with a key that holds every permission (it mints full-access keys): others get 403 on
`POST /organizations` and `DELETE /organizations/{id}`.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import AfterValidator, Field, StrictStr
from sqlmodel import col, select

from tidepool_api import organizations, otel_config, quotas
from tidepool_api.db import Organization
from tidepool_api.errors import not_found
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.api_keys import ApiKeyDto, issue_key, key_dto
from tidepool_api.routes.deps import Caller, Context, FullAccess
from tidepool_api.schemas import PlainName, WireModel, error_responses, invalid, iso
from tidepool_contracts.permissions import ALL_PERMISSIONS

router = APIRouter(responses=error_responses(401))


class CreateOrganizationRequest(WireModel):
    """`CreateOrganization` (`defaultRegionId` is ignored: one region per installation)."""

    name: PlainName


class OrganizationCreatedDto(WireModel):
    """The new organization and its first key (the only time that key's value is shown)."""

    id: str
    name: str
    created_at: str
    api_key: ApiKeyDto


class OrganizationDto(WireModel):
    """`Organization`, as far as Tidepool has it (no users: `personal` is always false)."""

    id: str
    name: str
    created_at: str
    personal: bool
    is_admin: bool


@router.get("/organizations", response_model=list[OrganizationDto])
async def list_organizations(context: Context, caller: Caller) -> JsonResponse:
    """Daytona's "the caller's organizations": the admin organization's keys see every organization that
    is not deleted, any other key only its own."""
    admin = await organizations.is_admin(context, caller.organization_id)
    query = select(Organization).where(col(Organization.deleted_at).is_(None))
    if not admin:
        query = query.where(Organization.id == caller.organization_id)
    async with context.database.sessions() as session:
        found = (await session.exec(query.order_by(col(Organization.created_at)))).all()
    return JsonResponse(
        [
            {
                "id": organization.id,
                "name": organization.name,
                "createdAt": iso(organization.created_at),
                "personal": False,
                "isAdmin": organization.is_admin,
            }
            for organization in found
        ]
    )


@router.post(
    "/organizations",
    status_code=201,
    response_model=OrganizationCreatedDto,
    responses=error_responses(400, 403, 409, 413),
)
async def create_organization(
    context: Context, caller: FullAccess, body: CreateOrganizationRequest
) -> JsonResponse:
    """Self-hosted administration: the admin organization creates tenants, each with a first key."""
    await organizations.require_admin(context, caller.organization_id)
    organization = Organization(id=str(uuid.uuid4()), name=body.name)
    async with context.database.sessions() as session:
        session.add(organization)
        await session.commit()
    await otel_config.publish(context, organization)
    api_key, value = await issue_key(context, organization.id, "default", None, ALL_PERMISSIONS)
    return JsonResponse(
        status_code=201,
        content={
            "id": organization.id,
            "name": organization.name,
            "createdAt": iso(organization.created_at),
            "apiKey": key_dto(api_key, value),
        },
    )


@router.delete(
    "/organizations/{organization_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(403, 404),
)
async def delete_organization(context: Context, caller: FullAccess, organization_id: str) -> Response:
    """Admin only: revoke the organization's keys at once, delete its sandboxes (their containers go
    asynchronously, through the runners), snapshots and registries; 404 for an unknown or deleted one."""
    await organizations.require_admin(context, caller.organization_id)
    await organizations.delete_organization(context, organization_id, deleted_by=caller.organization_id)
    return Response(status_code=204)


# An HTTP header name (RFC 9110 token) and a value without control characters.
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}")
_HEADER_VALUE = re.compile(r"[^\x00-\x1f\x7f]{0,4096}")
OTEL_HEADERS_MAX = 32
OTEL_SCHEMES = ("http", "https", "grpc", "grpcs")


def otlp_endpoint(value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number in 0-65535)
    except ValueError:
        raise invalid("the port must be a number from 1 to 65535") from None
    if parts.scheme not in OTEL_SCHEMES or not parts.hostname or parts.query or parts.fragment:
        raise invalid("must be an http(s):// (OTLP/HTTP) or grpc(s):// (OTLP/gRPC) URL with a host")
    if any(character.isspace() for character in value):
        raise invalid("must not contain spaces")
    return value


def otlp_headers(value: dict[str, str]) -> dict[str, str]:
    if len(value) > OTEL_HEADERS_MAX:
        raise invalid("at most {limit} headers", limit=OTEL_HEADERS_MAX)
    for name, header in value.items():
        if not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(header):
            raise invalid("header names must be HTTP tokens, values 4096 characters without control ones")
    return value


class OtelConfigDto(WireModel):
    """Daytona's `OtelConfig`: where the organization's telemetry goes (feature inventory §10).

    `endpoint`: `http(s)://host[:port][/base]` is OTLP/HTTP (`/v1/metrics` is appended, as
    OTEL_EXPORTER_OTLP_ENDPOINT), `grpc(s)://host:port` OTLP/gRPC. `headers`: sent with every export
    (e.g. `{"api-key": "..."}`), stored encrypted."""

    endpoint: Annotated[StrictStr, Field(min_length=1, max_length=2048), AfterValidator(otlp_endpoint)]
    headers: Annotated[dict[StrictStr, StrictStr], AfterValidator(otlp_headers)] | None = None
    organization_id: str | None = None


@router.get(
    "/organizations/{organization_id}/otel-config",
    response_model=OtelConfigDto,
    responses=error_responses(403, 404),
)
async def get_otel_config(context: Context, caller: FullAccess, organization_id: str) -> JsonResponse:
    """The caller's own organization's OTLP destination, headers included (hence a full-access key);
    404 when none is set, or for another organization."""
    endpoint, headers = await otel_config.get_config(context, caller.organization_id, organization_id)
    return JsonResponse(content={"endpoint": endpoint, "headers": headers, "organizationId": organization_id})


@router.put(
    "/organizations/{organization_id}/otel-config",
    status_code=204,
    response_class=Response,
    responses=error_responses(400, 403, 404),
)
async def put_otel_config(
    context: Context, caller: FullAccess, organization_id: str, body: OtelConfigDto
) -> Response:
    """Set the organization's OTLP destination (204, as Daytona): its metrics (`daytona.sandbox.used_cpu`,
    ...) go there from the next export on, without a restart. 404 for another organization; 400 for an
    endpoint whose host is or resolves to a non-public address (loopback, private, link-local, ...) outside
    `TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS` (tidepool_api.otel_config.check_endpoint)."""
    headers = body.headers or {}
    await otel_config.set_config(context, caller.organization_id, organization_id, body.endpoint, headers)
    return Response(status_code=204)


@router.delete(
    "/organizations/{organization_id}/otel-config",
    status_code=204,
    response_class=Response,
    responses=error_responses(403, 404),
)
async def delete_otel_config(context: Context, caller: FullAccess, organization_id: str) -> Response:
    """Stop exporting to the organization's destination (idempotent); 404 for another organization."""
    await otel_config.set_config(context, caller.organization_id, organization_id, None, {})
    return Response(status_code=204)


QUOTA_FIELDS = (
    "total_cpu_quota",
    "total_memory_quota",
    "total_disk_quota",
    "max_cpu_per_sandbox",
    "max_memory_per_sandbox",
    "max_disk_per_sandbox",
    "snapshot_quota",
    "max_snapshot_size",
    "volume_quota",
    "authenticated_rate_limit",
    "sandbox_create_rate_limit",
    "sandbox_lifecycle_rate_limit",
    "authenticated_rate_limit_ttl_seconds",
    "sandbox_create_rate_limit_ttl_seconds",
    "sandbox_lifecycle_rate_limit_ttl_seconds",
)
# The per-sandbox maxima always have a value (Daytona's org columns): null puts the default back.
PER_SANDBOX_DEFAULTS = {"max_cpu_per_sandbox": 4, "max_memory_per_sandbox": 8, "max_disk_per_sandbox": 10}
Quantity = Annotated[int | None, Field(ge=0, le=1_000_000)]


class UpdateOrganizationQuotaRequest(WireModel):
    """Daytona's `UpdateOrganizationQuota` (nullable fields), plus the totals Daytona keeps per region
    (`totalCpuQuota` vCPU, `totalMemoryQuota` GiB, `totalDiskQuota` GiB: one region here). A field left
    out is unchanged; `null` puts the installation's default back (its tier, `TIDEPOOL_QUOTA_TIER`)."""

    total_cpu_quota: Quantity = None
    total_memory_quota: Quantity = None
    total_disk_quota: Quantity = None
    max_cpu_per_sandbox: Quantity = None
    max_memory_per_sandbox: Quantity = None
    max_disk_per_sandbox: Quantity = None
    snapshot_quota: Quantity = None
    max_snapshot_size: Quantity = None
    volume_quota: Quantity = None
    authenticated_rate_limit: Quantity = None
    sandbox_create_rate_limit: Quantity = None
    sandbox_lifecycle_rate_limit: Quantity = None
    authenticated_rate_limit_ttl_seconds: Quantity = None
    sandbox_create_rate_limit_ttl_seconds: Quantity = None
    sandbox_lifecycle_rate_limit_ttl_seconds: Quantity = None


class OrganizationUsageDto(WireModel):
    """What the organization may use and uses now (`null` quota: unlimited). cpu in vCPU, memory and disk
    in GiB, snapshot size in GB."""

    total_cpu_quota: int | None
    total_memory_quota: int | None
    total_disk_quota: int | None
    current_cpu_usage: int
    current_memory_usage: int
    current_disk_usage: int
    max_cpu_per_sandbox: int
    max_memory_per_sandbox: int
    max_disk_per_sandbox: int
    total_snapshot_quota: int | None
    current_snapshot_usage: int
    max_snapshot_size: int | None
    total_volume_quota: int | None
    current_volume_usage: int


@router.patch(
    "/organizations/{organization_id}/quota",
    response_model=OrganizationUsageDto,
    responses=error_responses(400, 403, 404),
)
async def update_quota(
    context: Context, caller: FullAccess, organization_id: str, body: UpdateOrganizationQuotaRequest
) -> JsonResponse:
    """Admin only (403 otherwise): set an organization's quotas and rate limits (Daytona's
    `PATCH /organizations/{id}/quota`); answers its usage with the new limits. 404: unknown or deleted."""
    await organizations.require_admin(context, caller.organization_id)
    given = body.model_fields_set & set(QUOTA_FIELDS)
    async with context.database.sessions() as session:
        organization = await session.get(Organization, organization_id)
        if organization is None or organization.deleted_at is not None:
            raise not_found(f"Organization {organization_id} not found")
        for name in given:
            value = getattr(body, name)
            setattr(organization, name, PER_SANDBOX_DEFAULTS.get(name) if value is None else value)
        session.add(organization)
        await session.commit()
        await session.refresh(organization)
    if context.rate_limiter is not None:
        context.rate_limiter.forget(organization_id)  # new rate limits apply at once
    # The telemetry service reports the totals as `daytona.sandbox.total_*`: they follow at once.
    await otel_config.publish(context, organization)
    return JsonResponse(content=await organization_usage(context, organization_id))


@router.get(
    "/organizations/{organization_id}/usage",
    response_model=OrganizationUsageDto,
    responses=error_responses(404),
)
async def get_usage(context: Context, caller: Caller, organization_id: str) -> JsonResponse:
    """The organization's quotas and current usage: its own keys, or the admin's (404 for any other)."""
    if caller.organization_id != organization_id and not await organizations.is_admin(
        context, caller.organization_id
    ):
        raise not_found(f"Organization {organization_id} not found")
    return JsonResponse(content=await organization_usage(context, organization_id))


async def organization_usage(context: Context, organization_id: str) -> dict[str, object]:
    async with context.database.sessions() as session:
        organization = await session.get(Organization, organization_id)
        if organization is None or organization.deleted_at is not None:
            raise not_found(f"Organization {organization_id} not found")
        limits = quotas.limits_of(organization, context.settings)
        used = await quotas.usage(session, organization_id)
        snapshots, volumes = await quotas.counts(session, organization_id)
    return OrganizationUsageDto(
        total_cpu_quota=limits.total_cpu,
        total_memory_quota=limits.total_memory,
        total_disk_quota=limits.total_disk,
        current_cpu_usage=used.cpu,
        current_memory_usage=used.memory,
        current_disk_usage=used.disk,
        max_cpu_per_sandbox=limits.max_cpu_per_sandbox,
        max_memory_per_sandbox=limits.max_memory_per_sandbox,
        max_disk_per_sandbox=limits.max_disk_per_sandbox,
        total_snapshot_quota=limits.snapshot_quota,
        current_snapshot_usage=snapshots,
        max_snapshot_size=limits.max_snapshot_size,
        total_volume_quota=limits.volume_quota,
        current_volume_usage=volumes,
    ).model_dump(by_alias=True)
