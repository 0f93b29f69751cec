"""`GET /sandbox/{id}/telemetry/metrics`: a sandbox's stored resource samples (wire contract §2.2, the SDK's
`Sandbox.get_metrics`), answered by the telemetry service over the bus; the API checks the tenant first.

`GET /sandbox/{id}/network/flows`: the sandbox's flow log (Tidepool's own; no Daytona wire), from the bus.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from tidepool_api import sandboxes
from tidepool_api.errors import ApiError, bad_request
from tidepool_api.flows import read_flows
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context
from tidepool_api.schemas import MetricsResponseDto, NetworkFlowsDto, error_responses
from tidepool_contracts import channels
from tidepool_contracts.models import SandboxMetricsQuery, SandboxMetricsReply

router = APIRouter(prefix="/sandbox", tags=["sandbox"], responses=error_responses(401))
QUERY_TIMEOUT_SECONDS = 10.0
METRIC_NAMES_MAX = 64
FLOWS_MAX = 1000


def wire_timestamp(moment: datetime) -> str:
    """UTC, ISO 8601 with `Z` (the SDK parses it with `fromisoformat` after replacing `Z`)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@router.get(
    "/{sandbox_id_or_name}/telemetry/metrics",
    response_model=MetricsResponseDto,
    responses=error_responses(400, 404, 503),
)
async def sandbox_metrics(
    context: Context,
    caller: Caller,
    sandbox_id_or_name: str,
    start: Annotated[datetime, Query(alias="from")],
    end: Annotated[datetime, Query(alias="to")],
    metric_names: Annotated[list[str] | None, Query(alias="metricNames")] = None,
) -> JsonResponse:
    """Series of the sandbox's CPU (% of its limit, cores), memory and filesystem (bytes, %) and network
    (bytes received/sent) samples between `from` and `to` (ISO 8601; without a zone: UTC). `metricNames`
    (repeated, or comma-separated as the analytics API takes them) picks Daytona's names; none: all.
    404 for another organization's sandbox; 503 when the telemetry service does not answer."""
    start, end = (moment if moment.tzinfo else moment.replace(tzinfo=UTC) for moment in (start, end))
    if end < start:
        raise bad_request("`to` must not be before `from`")
    names = [name.strip() for value in metric_names or [] for name in value.split(",") if name.strip()]
    if len(names) > METRIC_NAMES_MAX:
        raise bad_request(f"at most {METRIC_NAMES_MAX} metricNames")
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    query = SandboxMetricsQuery(sandbox_id=sandbox.id, start=start, end=end, metric_names=names)
    try:
        reply = await context.bus.request(
            channels.SANDBOX_METRICS_QUERY, query, timeout=QUERY_TIMEOUT_SECONDS
        )
    except (NatsTimeoutError, NoRespondersError, TimeoutError) as error:
        raise ApiError(503, "sandbox telemetry is temporarily unavailable; retry") from error
    assert isinstance(reply, SandboxMetricsReply)
    return JsonResponse(
        MetricsResponseDto.model_validate(
            {
                "series": [
                    {
                        "metricName": one.metric_name,
                        "dataPoints": [
                            {"timestamp": wire_timestamp(point.timestamp), "value": point.value}
                            for point in one.points
                        ],
                    }
                    for one in reply.series
                ]
            }
        ).model_dump(by_alias=True)
    )


@router.get(
    "/{sandbox_id_or_name}/network/flows",
    response_model=NetworkFlowsDto,
    responses=error_responses(400, 404, 503),
)
async def sandbox_network_flows(
    context: Context,
    caller: Caller,
    sandbox_id_or_name: str,
    since: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=FLOWS_MAX)] = 100,
    verdict: Annotated[Literal["allowed", "denied"] | None, Query()] = None,
) -> JsonResponse:
    """The sandbox's flow log: new connections (and UDP flows) its network policy allowed or denied, with
    time, destination, port and the rule that decided; the newest `limit` (from `since` on, ISO 8601),
    oldest first, only `verdict`'s if given. Kept 3 days. Only sandboxes with a network policy
    (networkBlockAll, networkAllowList, domainAllowList) have one. 404 for another organization's sandbox."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    async with context.database.sessions() as session:
        sandbox = await sandboxes.find_sandbox(session, caller.organization_id, sandbox_id_or_name)
    try:
        flows = await read_flows(context.bus, sandbox.id, since, FLOWS_MAX)
    except (NatsTimeoutError, TimeoutError) as error:
        raise ApiError(503, "the flow log is temporarily unavailable; retry") from error
    chosen = [flow for flow in flows if verdict is None or flow.verdict == verdict][-limit:]
    return JsonResponse(
        NetworkFlowsDto.model_validate(
            {
                "flows": [
                    {
                        "time": wire_timestamp(flow.time),
                        "protocol": flow.protocol,
                        "source": flow.source,
                        "destination": flow.destination,
                        "port": flow.port,
                        "verdict": flow.verdict,
                        "rule": flow.rule,
                    }
                    for flow in chosen
                ]
            }
        ).model_dump(by_alias=True)
    )
