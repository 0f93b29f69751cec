"""An organization's OTLP destination (`/organizations/{id}/otel-config`) and what the telemetry service is
told of it (feature inventory §10 B: the organization metrics go there every 60 s).

The headers often carry the destination's API key: in the database they are sealed by the API's
SecretBox, on the bus (KV `ORGANIZATION_TELEMETRY`) sealed for the telemetry service only
(`tidepool_runtime.sealing.OTEL_HEADERS`); they are never logged.

The endpoint is the tenant's: it must reach public addresses only, or the operator's
`TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS` (tidepool_runtime.netguard), else the telemetry service would send
requests inside the operator's network for it. The operator's own endpoint (from the environment) is trusted.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson
import structlog
from sqlmodel import col, select

from tidepool_api import quotas
from tidepool_api.context import ApiContext
from tidepool_api.db import Organization
from tidepool_api.errors import bad_request, not_found
from tidepool_contracts.models import OrganizationTelemetry
from tidepool_runtime import netguard
from tidepool_runtime.broker import kv_delete, kv_put

log = structlog.get_logger("tidepool.api.otel_config")


def _headers(context: ApiContext, organization: Organization) -> dict[str, str]:
    if not organization.otel_headers_sealed:
        return {}
    assert context.secret_box is not None
    return dict(orjson.loads(context.secret_box.open(organization.otel_headers_sealed)))


def telemetry_record(context: ApiContext, organization: Organization) -> OrganizationTelemetry:
    """What the telemetry service needs of `organization`: destination (headers sealed for it), and the
    totals the quotas enforce (`quotas.limits_of`: its own values, else the tier's; None: unlimited)."""
    headers = _headers(context, organization)
    limits = quotas.limits_of(organization, context.settings)
    return OrganizationTelemetry(
        organization_id=organization.id,
        endpoint=organization.otel_endpoint or "",
        headers_sealed=context.otel_sealer.seal(orjson.dumps(headers).decode()) if headers else "",
        total_cpu=limits.total_cpu,
        total_memory_gib=limits.total_memory,
        total_disk_gib=limits.total_disk,
    )


async def publish(context: ApiContext, organization: Organization) -> None:
    """Mirror `organization` to KV (a deleted one is removed): the telemetry service follows the bucket."""
    kv = context.organization_telemetry_kv
    if kv is None:
        return
    if organization.deleted_at is not None:
        await kv_delete(kv, organization.id)
    else:
        await kv_put(kv, organization.id, telemetry_record(context, organization))


async def mirror_all(context: ApiContext) -> None:
    """At start: every live organization to KV (the bucket may be new, or have missed a write)."""
    async with context.database.sessions() as session:
        rows = (await session.exec(select(Organization).where(col(Organization.deleted_at).is_(None)))).all()
    for organization in rows:
        await publish(context, organization)


async def _own(context: ApiContext, caller_organization_id: str, organization_id: str) -> Organization:
    """The caller's own live organization; 404 for another one (tenants never see each other)."""
    async with context.database.sessions() as session:
        organization = await session.get(Organization, organization_id)
    if organization is None or organization.id != caller_organization_id or organization.deleted_at:
        raise not_found(f"Organization {organization_id} not found")
    return organization


async def get_config(
    context: ApiContext, caller_organization_id: str, organization_id: str
) -> tuple[str, dict[str, str]]:
    """`(endpoint, headers)`; 404 for another organization, or when none is set."""
    organization = await _own(context, caller_organization_id, organization_id)
    if not organization.otel_endpoint:
        raise not_found(f"Organization {organization_id} has no OpenTelemetry configuration")
    return organization.otel_endpoint, _headers(context, organization)


async def check_endpoint(context: ApiContext, endpoint: str) -> None:
    """Raise ApiError 400 when `endpoint`'s host resolves to an address that is not public (and not in the
    operator's allow-list). A name that does not resolve now is accepted: what it resolves to can change
    at any time anyway (the telemetry service checks its OTLP/HTTP connections again)."""
    parts = urlsplit(endpoint)
    assert parts.hostname is not None  # the route's validator asked for a host
    try:
        await netguard.check_host(
            parts.hostname, parts.port, context.settings.tenant_endpoint_allowed_networks
        )
    except netguard.BlockedAddressError as refused:
        raise bad_request(
            f"The OTLP endpoint must reach a public address: {refused}; an operator can allow a network "
            "with TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS"
        ) from None
    except OSError:
        log.info("organization.otel_endpoint_unresolved", host=parts.hostname)


async def set_config(
    context: ApiContext,
    caller_organization_id: str,
    organization_id: str,
    endpoint: str | None,
    headers: dict[str, str],
) -> None:
    """Replace the destination (None: remove it); the telemetry service picks it up from KV at once.
    404 for another organization, then 400 for an endpoint that reaches a non-public address."""
    await _own(context, caller_organization_id, organization_id)
    if endpoint:
        await check_endpoint(context, endpoint)
    assert context.secret_box is not None
    async with context.database.sessions() as session:
        organization = await session.get(Organization, organization_id)
        assert organization is not None
        organization.otel_endpoint = endpoint
        organization.otel_headers_sealed = (
            context.secret_box.seal(orjson.dumps(headers).decode()) if endpoint and headers else None
        )
        session.add(organization)
        await session.commit()
        await session.refresh(organization)
    await publish(context, organization)
    log.info("organization.otel_config", organization_id=organization_id, set=endpoint is not None)
