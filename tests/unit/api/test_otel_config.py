"""`/organizations/{id}/otel-config` against a real nats-server and SQLite: the headers are encrypted at
rest, sealed on the bus for the telemetry service alone, and what the telemetry service reads is current."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from tidepool_api.app import create_app
from tidepool_api.auth import Authenticator
from tidepool_api.bootstrap import ensure_admin, mirror_api_keys
from tidepool_api.context import ApiContext
from tidepool_api.db import Database, Organization
from tidepool_api.migrate import migrate
from tidepool_api.secrets_box import SecretBox
from tidepool_contracts import channels
from tidepool_contracts.models import OrganizationTelemetry
from tidepool_runtime import sealing
from tidepool_runtime.broker import Bus, create_broker, kv_get
from tidepool_runtime.settings import Settings

SECRET = "nr-license-0123456789abcdef"


@pytest.fixture
async def api(nats_url: str, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, ApiContext, str]]:
    settings = Settings(data_dir=tmp_path, nats_url=nats_url, database_url="")
    await migrate(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    bus = Bus(create_broker(nats_url, "test-api"))
    await bus.connect()
    context = ApiContext(
        settings=settings,
        database=database,
        bus=bus,
        desired_kv=await bus.kv(channels.DESIRED),
        api_keys_kv=await bus.kv(channels.API_KEYS),
        authenticator=Authenticator(database),
        secret_box=SecretBox("test-secret-key"),
        organization_telemetry_kv=await bus.kv(channels.ORGANIZATION_TELEMETRY),
    )
    await ensure_admin(context)
    await mirror_api_keys(context)
    await bus.start()
    key = (tmp_path / "admin-api-key").read_text().strip()
    principal = await context.authenticator.authenticate_token(key)
    transport = httpx.ASGITransport(app=create_app(context))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        yield client, context, principal.organization_id
    await bus.close()
    await database.close()


async def test_headers_are_encrypted_at_rest_and_sealed_for_telemetry(api) -> None:  # type: ignore[no-untyped-def]
    client, context, organization_id = api
    path = f"/api/organizations/{organization_id}/otel-config"
    assert (await client.get(path)).status_code == 404

    body = {"endpoint": "https://otlp.example.com:4318", "headers": {"api-key": SECRET}}
    assert (await client.put(path, json=body)).status_code == 204
    answer = await client.get(path)
    assert answer.status_code == 200
    assert answer.json() == {**body, "organizationId": organization_id}

    async with context.database.sessions() as session:
        row = await session.get(Organization, organization_id)
    assert row is not None and row.otel_headers_sealed and SECRET not in row.otel_headers_sealed
    assert orjson.loads(context.secret_box.open(row.otel_headers_sealed)) == {"api-key": SECRET}

    record = await kv_get(context.organization_telemetry_kv, organization_id, OrganizationTelemetry)
    assert record is not None and record.endpoint == body["endpoint"]
    assert SECRET not in record.model_dump_json()
    key = sealing.load_seal_key("", context.settings.data_dir, sealing.OTEL_HEADERS)
    opened = sealing.Sealer(key, sealing.OTEL_HEADERS).open(record.headers_sealed)
    assert orjson.loads(opened) == {"api-key": SECRET}
    with pytest.raises(ValueError):  # another purpose's key cannot open it
        sealing.Sealer(key, sealing.SIGNING_KEYS).open(record.headers_sealed)

    assert (await client.delete(path)).status_code == 204
    assert (await client.get(path)).status_code == 404
    record = await kv_get(context.organization_telemetry_kv, organization_id, OrganizationTelemetry)
    assert record is not None and (record.endpoint, record.headers_sealed) == ("", "")


@pytest.mark.parametrize(
    "body",
    [
        {"endpoint": "ftp://otlp.example.com"},
        {"endpoint": "otlp.example.com:4317"},
        {"endpoint": "http://"},
        {"endpoint": "http://otlp.example.com:99999"},
        {"endpoint": "grpc://otlp.example.com:port"},
        {"endpoint": "http://otlp example.com"},
        {"endpoint": "https://otlp.example.com", "headers": {"api-key": "a\r\nX-Injected: 1"}},
        {"endpoint": "https://otlp.example.com", "headers": {"bad name": "v"}},
        {"headers": {"api-key": "v"}},
    ],
)
async def test_invalid_configs_are_refused(api, body: dict) -> None:  # type: ignore[no-untyped-def]
    client, _, organization_id = api
    answer = await client.put(f"/api/organizations/{organization_id}/otel-config", json=body)
    assert answer.status_code == 400, answer.text
    assert (await client.get(f"/api/organizations/{organization_id}/otel-config")).status_code == 404


@pytest.mark.parametrize(
    ("endpoint", "kind"),
    [
        ("http://127.0.0.1:4318", "loopback"),
        ("http://localhost:4318", "loopback"),
        ("grpc://[::1]:4317", "loopback"),
        ("http://169.254.169.254/latest", "link-local"),
        ("https://10.0.0.7:4318", "private"),
        ("grpcs://[::ffff:192.168.1.1]:4317", "private"),
        ("http://[fd00::5]:4318", "private"),
        ("http://100.100.100.100:4318", "CGNAT"),
        ("grpc://0.0.0.0:4317", "unspecified"),
    ],
)
async def test_an_endpoint_inside_the_operators_network_is_refused(api, endpoint: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    client, context, organization_id = api
    path = f"/api/organizations/{organization_id}/otel-config"
    answer = await client.put(path, json={"endpoint": endpoint})
    assert answer.status_code == 400, answer.text
    assert kind in answer.json()["message"] and "public address" in answer.json()["message"]
    assert (await client.get(path)).status_code == 404
    record = await kv_get(context.organization_telemetry_kv, organization_id, OrganizationTelemetry)
    assert record is None or record.endpoint == ""
    # A public address is taken.
    assert (await client.put(path, json={"endpoint": "grpcs://192.0.0.9:4317"})).status_code == 204


async def test_the_totals_are_the_enforced_quotas_and_follow_a_quota_change(api) -> None:  # type: ignore[no-untyped-def]
    client, context, admin_id = api
    created = await client.post("/api/organizations", json={"name": "metered"})
    assert created.status_code == 201, created.text
    organization_id = created.json()["id"]

    async def totals(organization: str) -> tuple[float | None, float | None, float | None]:
        record = await kv_get(context.organization_telemetry_kv, organization, OrganizationTelemetry)
        assert record is not None
        return record.total_cpu, record.total_memory_gib, record.total_disk_gib

    # A tenant: the installation's tier (tier 1, memory from TIDEPOOL_QUOTA_TIER1_MEMORY_GIB).
    assert await totals(organization_id) == (10, context.settings.quota_tier1_memory_gib, 30)
    # The admin organization has no totals unless set on its row: nothing to report.
    await client.put(f"/api/organizations/{admin_id}/otel-config", json={"endpoint": "http://192.0.0.9:9"})
    assert await totals(admin_id) == (None, None, None)

    answer = await client.patch(
        f"/api/organizations/{organization_id}/quota",
        json={"totalCpuQuota": 24, "totalMemoryQuota": 48, "totalDiskQuota": 96},
    )
    assert answer.status_code == 200, answer.text
    assert await totals(organization_id) == (24, 48, 96)
    answer = await client.patch(f"/api/organizations/{organization_id}/quota", json={"totalCpuQuota": None})
    assert answer.status_code == 200, answer.text
    assert await totals(organization_id) == (10, 48, 96)
