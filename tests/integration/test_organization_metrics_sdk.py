"""Issue #14: the organization metrics (feature inventory §10 B) reach the organization's own OTLP endpoint
after `PUT /organizations/{id}/otel-config`, without a restart, and the operator's endpoint for every
organization.

A stack of its own that exports every second (TIDEPOOL_ORGANIZATION_METRICS_INTERVAL_SECONDS) to a real
OTLP receiver on loopback (tests/integration/otlp_receiver.py: OTLP/HTTP and OTLP/gRPC from the OTLP
protobuf definitions). The otel-config calls go through the official SDK's API client. And every service
serves Prometheus `/metrics`.
"""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest
from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaConfig, Sandbox
from daytona_api_client import OrganizationsApi, OtelConfig
from daytona_api_client.exceptions import NotFoundException

from tests.integration.otlp_receiver import MetricsReceiver, Point
from tests.integration.stackthread import StackThread, own_stack
from tests.polling import wait_until
from tidepool_stack.supervisor import SERVICES

pytestmark = pytest.mark.integration
REGION = "us"  # TIDEPOOL_RUNNER_REGION's default
# Daytona's default quotas (design digest §7, tier 1), what Tidepool reports as `total_*` for an
# organization whose quota was not changed.
TOTALS = {"total_cpu": 10, "total_ram": 10, "total_storage": 30}


@pytest.fixture(scope="module")
def receiver() -> Iterator[MetricsReceiver]:
    running = MetricsReceiver()
    running.start()
    yield running
    running.stop()


def free_port_block(count: int) -> int:
    """The first of `count` consecutive loopback ports free now (`make up` numbers services from a base)."""
    while True:
        base = random.randrange(20000, 60000)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


@pytest.fixture(scope="module")
def metrics_base_port() -> int:
    return free_port_block(len(SERVICES))


@pytest.fixture(scope="module")
def metrics_stack(
    tmp_path_factory: pytest.TempPathFactory, receiver: MetricsReceiver, metrics_base_port: int
) -> Iterator[StackThread]:
    with own_stack(
        tmp_path_factory.mktemp("orgmetrics"),
        extra_env={
            "TIDEPOOL_ORGANIZATION_METRICS_INTERVAL_SECONDS": "1",
            "TIDEPOOL_ORGANIZATION_METRICS_OTLP_ENDPOINT": receiver.http_url,
            "TIDEPOOL_METRICS_PORT": str(metrics_base_port),
            "TIDEPOOL_SANDBOX_METRICS_INTERVAL_SECONDS": "1",
            "TIDEPOOL_SANDBOX_METRICS_EXPORT_INTERVAL_SECONDS": "1",
        },
    ) as running:
        yield running


def new_organization(stack: StackThread) -> tuple[str, Daytona]:
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"metrics-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    return body["id"], Daytona(DaytonaConfig(api_key=body["apiKey"]["value"], api_url=stack.api_url))


def organizations_api(daytona: Daytona) -> OrganizationsApi:
    return OrganizationsApi(daytona._api_client)


def latest(points: list[Point], organization_id: str, transport: str, header: tuple[str, str] | None) -> dict:
    """The last value of each organization metric received for `organization_id` over `transport` (with
    request header `header` when given), keyed by the name after `daytona.sandbox.`."""
    values: dict[str, float] = {}
    for point in points:
        if point.transport != transport or point.resource.get("organization.id") != organization_id:
            continue
        if header is not None and point.headers.get(header[0]) != header[1]:
            continue
        if point.name.startswith("daytona.sandbox."):
            assert point.attributes == {"region.id": REGION}, point
            values[point.name.removeprefix("daytona.sandbox.")] = point.value
    return values


def arrives(
    receiver: MetricsReceiver,
    organization_id: str,
    transport: str,
    header: tuple[str, str] | None,
    expected: dict[str, float],
) -> None:
    """Wait until the last values received for `organization_id` are `expected`."""
    wait_until(
        lambda: latest(receiver.points(), organization_id, transport, header) == expected,
        lambda: f"{transport} {header}: {latest(receiver.points(), organization_id, transport, header)}",
    )


def exports_passed(receiver: MetricsReceiver, count: int, organization_id: str) -> None:
    """Wait until `count` more exports of the operator's endpoint (1 s apart) have arrived, counted by the one
    `used_cpu` point each carries for `organization_id` (over HTTP, without a team's own headers)."""

    def operator_exports() -> list[int]:
        return [
            id(p)
            for p in receiver.points()
            if p.transport == "http"
            and p.name.endswith("used_cpu")
            and p.resource.get("organization.id") == organization_id
            and "api-key" not in p.headers
        ]

    seen = set(operator_exports())
    wait_until(
        lambda: len(set(operator_exports()) - seen) >= count, "the operator's endpoint stopped receiving"
    )


def test_organization_metrics_reach_its_endpoint_after_put_without_a_restart(
    metrics_stack: StackThread, receiver: MetricsReceiver
) -> None:
    team_id, team = new_organization(metrics_stack)
    other_id, other = new_organization(metrics_stack)

    def create(daytona: Daytona, snapshot: str) -> Sandbox:
        return daytona.create(CreateSandboxFromSnapshotParams(snapshot=snapshot), timeout=180)

    sandboxes = []
    try:
        # Sizes (cpu, GiB memory, GiB disk): daytona-small (1, 1, 3), daytona-medium (2, 4, 8).
        sandboxes += [create(team, "daytona-small"), create(team, "daytona-medium")]
        stopped = create(team, "daytona-small")
        sandboxes.append(stopped)
        stopped.stop()
        sandboxes.append(create(other, "daytona-medium"))
        # Started ones count cpu, memory and disk; the stopped one its disk only; the other organization's
        # sandbox is not the team's.
        team_expected = {"used_cpu": 3, "used_ram": 5, "used_storage": 14, **TOTALS}
        other_expected = {"used_cpu": 2, "used_ram": 4, "used_storage": 8, **TOTALS}

        # The operator's endpoint gets every organization's metrics, each under its own resource.
        arrives(receiver, team_id, "http", None, team_expected)
        arrives(receiver, other_id, "http", None, other_expected)

        # No configuration yet: 404, for the team and for another organization asking about the team.
        api = organizations_api(team)
        with pytest.raises(NotFoundException):
            api.get_organization_otel_config(team_id)

        # The team's own endpoint, OTLP/HTTP with a header: picked up by the running telemetry service.
        secret = f"key-{uuid.uuid4().hex}"
        api.update_organization_otel_config(
            team_id, OtelConfig(endpoint=f"{receiver.http_url}/", headers={"api-key": secret})
        )
        config = api.get_organization_otel_config(team_id)
        assert (config.endpoint, config.headers) == (f"{receiver.http_url}/", {"api-key": secret})
        arrives(receiver, team_id, "http", ("api-key", secret), team_expected)

        # Another organization sees no trace of it, and cannot change it.
        other_api = organizations_api(other)
        with pytest.raises(NotFoundException):
            other_api.get_organization_otel_config(team_id)
        with pytest.raises(NotFoundException):
            other_api.update_organization_otel_config(team_id, OtelConfig(endpoint="http://127.0.0.1:9/"))
        with pytest.raises(NotFoundException):
            other_api.delete_organization_otel_config(team_id)
        assert api.get_organization_otel_config(team_id).endpoint == f"{receiver.http_url}/"
        leaked = [p for p in receiver.points() if p.headers.get("api-key") == secret]
        # Organization metrics name the owner `organization.id`, its sandboxes' `daytona_organization_id`.
        owners = {p.resource.get("organization.id") or p.resource["daytona_organization_id"] for p in leaked}
        assert owners == {team_id}

        # Switched to OTLP/gRPC, again without a restart; the values follow the sandboxes.
        grpc_secret = f"key-{uuid.uuid4().hex}"
        api.update_organization_otel_config(
            team_id, OtelConfig(endpoint=receiver.grpc_url, headers={"api-key": grpc_secret})
        )
        stopped.start()
        team_expected = {"used_cpu": 4, "used_ram": 6, "used_storage": 14, **TOTALS}
        arrives(receiver, team_id, "grpc", ("api-key", grpc_secret), team_expected)
        assert not latest(receiver.points(), other_id, "grpc", None)

        # Removed: nothing more goes to the old destination.
        api.delete_organization_otel_config(team_id)
        with pytest.raises(NotFoundException):
            api.get_organization_otel_config(team_id)
        # (The old destination gets one last export as its exporter shuts down: then nothing.)
        exports_passed(receiver, 3, team_id)
        settled = [p for p in receiver.points() if p.transport == "grpc"]
        exports_passed(receiver, 3, team_id)
        assert [p for p in receiver.points() if p.transport == "grpc"] == settled

        # The header values are secrets: never in the services' logs.
        log = metrics_stack.log_path.read_text()
        assert secret not in log and grpc_secret not in log
    finally:
        for sandbox in sandboxes:
            sandbox.delete()


def test_the_totals_follow_a_quota_change_without_a_restart(
    metrics_stack: StackThread, receiver: MetricsReceiver
) -> None:
    """`total_*` are the quotas the API enforces: an admin's `PATCH /organizations/{id}/quota` shows in the
    next export (they used to be Daytona's defaults, whatever the organization's quota)."""
    organization_id, _ = new_organization(metrics_stack)
    idle = {"used_cpu": 0, "used_ram": 0, "used_storage": 0}
    arrives(receiver, organization_id, "http", None, {**idle, **TOTALS})
    answer = httpx.patch(
        f"{metrics_stack.api_url}/organizations/{organization_id}/quota",
        json={"totalCpuQuota": 24, "totalMemoryQuota": 48, "totalDiskQuota": 96},
        headers={"Authorization": f"Bearer {metrics_stack.api_key}"},
    )
    assert answer.status_code == 200, answer.text
    arrives(
        receiver,
        organization_id,
        "http",
        None,
        {**idle, "total_cpu": 24, "total_ram": 48, "total_storage": 96},
    )


SANDBOX_METRICS = {
    "daytona.sandbox.cpu.utilization",
    "daytona.sandbox.cpu.limit",
    "daytona.sandbox.memory.utilization",
    "daytona.sandbox.memory.usage",
    "daytona.sandbox.memory.limit",
}


def test_sandbox_metrics_reach_the_organization_endpoint_with_its_labels(
    metrics_stack: StackThread, receiver: MetricsReceiver
) -> None:
    """Feature inventory §10 A: once the organization has an endpoint, each running sandbox's metrics go
    there under a resource of its own with Daytona's attributes and the sandbox's extra labels; another
    organization's sandboxes never do, nor go to the operator's endpoint."""
    team_id, team = new_organization(metrics_stack)
    _, other = new_organization(metrics_stack)
    secret = f"key-{uuid.uuid4().hex}"
    organizations_api(team).update_organization_otel_config(
        team_id, OtelConfig(endpoint=receiver.http_url, headers={"api-key": secret})
    )
    labelled = team.create(
        CreateSandboxFromSnapshotParams(
            snapshot="daytona-small",
            env_vars={"DAYTONA_SANDBOX_OTEL_EXTRA_LABELS": "team=backend, env=staging,x"},
        ),
        timeout=180,
    )
    foreign = other.create(CreateSandboxFromSnapshotParams(snapshot="daytona-small"), timeout=180)
    try:

        def of(sandbox_id: str) -> list[Point]:
            return [p for p in receiver.points() if p.resource.get("daytona_sandbox_id") == sandbox_id]

        wait_until(
            lambda: {p.name for p in of(labelled.id)} >= SANDBOX_METRICS,
            lambda: f"sandbox metrics received: {sorted({p.name for p in of(labelled.id)})}",
        )
        points = of(labelled.id)
        for point in points:
            assert point.transport == "http" and point.headers.get("api-key") == secret, point
            assert point.resource["daytona_organization_id"] == team_id
            assert point.resource["daytona_region_id"] == REGION
            assert point.resource["daytona_snapshot"] == "daytona-small"
            assert (point.resource["team"], point.resource["env"]) == ("backend", "staging")
            assert "x" not in point.resource
        values = {p.name: p.value for p in points}
        assert values["daytona.sandbox.cpu.limit"] == 1
        assert values["daytona.sandbox.memory.limit"] == 1024**3
        assert 0 < values["daytona.sandbox.memory.usage"] <= 1024**3
        assert 0 <= values["daytona.sandbox.cpu.utilization"] <= 100
        # The other organization has no endpoint: its sandbox's samples go nowhere (not to the operator's).
        exports_passed(receiver, 3, team_id)
        assert not of(foreign.id)
    finally:
        labelled.delete()
        foreign.delete()
        organizations_api(team).delete_organization_otel_config(team_id)


def test_every_service_serves_prometheus_metrics(metrics_stack: StackThread, metrics_base_port: int) -> None:
    """Each service on its own port (the base port + its place in SERVICES): the process's own metrics and
    the bus's (FastStream's OpenTelemetry metrics), under the service's name."""
    _, team = new_organization(metrics_stack)
    team.delete(team.create())  # traffic on the bus: an intent published, jobs and events consumed
    for index, service in enumerate(SERVICES):
        answer = httpx.get(f"http://127.0.0.1:{metrics_base_port + index}/metrics")
        assert answer.status_code == 200, service
        text = answer.text
        assert "process_resident_memory_bytes" in text and "tidepool_service_up" in text, service
        assert f'service_name="tidepool-{service}"' in text, service
    api = httpx.get(f"http://127.0.0.1:{metrics_base_port + SERVICES.index('api')}/metrics").text
    assert "messaging_publish_duration" in api
    scheduler = httpx.get(f"http://127.0.0.1:{metrics_base_port + SERVICES.index('scheduler')}/metrics").text
    assert "messaging_process_duration" in scheduler
