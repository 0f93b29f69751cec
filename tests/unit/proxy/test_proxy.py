"""The proxy in-process against a real nats-server and a fake runner: auth, tenancy, routes, streams, WS."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from tests.polling import wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.models import ApiKeyRecord, SandboxRoute
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import Bus, kv_delete, kv_put

from .conftest import RUNNER_TOKEN, FakeRunner

ORG = "org-main"
OTHER_ORG = "org-other"


async def add_api_key(
    bus: Bus,
    organization_id: str,
    *,
    revoked: bool = False,
    expires_at: datetime | None = None,
    permissions: tuple[str, ...] = ("write:sandboxes",),
) -> str:
    token = f"dtn_{uuid.uuid4().hex}"
    record = ApiKeyRecord(
        key_id=str(uuid.uuid4()),
        organization_id=organization_id,
        revoked=revoked,
        expires_at=expires_at,
        permissions=permissions,
    )
    await kv_put(await bus.kv(channels.API_KEYS), hashlib.sha256(token.encode()).hexdigest(), record)
    return token


async def add_route(
    bus: Bus, runner_url: str, *, organization_id: str = ORG, state: SandboxState = SandboxState.STARTED
) -> str:
    sandbox_id = str(uuid.uuid4())
    route = SandboxRoute(
        sandbox_id=sandbox_id,
        organization_id=organization_id,
        runner_id="runner-fake",
        runner_url=runner_url,
        state=state,
    )
    await kv_put(await bus.kv(channels.ROUTES), sandbox_id, route)
    return sandbox_id


@pytest.fixture
async def api_key(bus: Bus) -> str:
    return await add_api_key(bus, ORG)


@pytest.fixture
async def sandbox(bus: Bus, fake_runner: tuple[FakeRunner, str]) -> str:
    return await add_route(bus, fake_runner[1])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_body(response: aiohttp.ClientResponse) -> dict[str, object]:
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["source"] == "DAYTONA_PROXY"
    assert body["statusCode"] == response.status
    return body


async def test_health(http: aiohttp.ClientSession, proxy_url: str) -> None:
    async with http.get(f"{proxy_url}/health") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic abc"}]
)
async def test_missing_or_unknown_key_is_401(
    http: aiohttp.ClientSession, proxy_url: str, sandbox: str, headers: dict[str, str]
) -> None:
    async with http.get(f"{proxy_url}/toolbox/{sandbox}/version", headers=headers) as response:
        assert response.status == 401
        await error_body(response)


async def test_revoked_and_expired_keys_are_401(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, sandbox: str
) -> None:
    revoked = await add_api_key(bus, ORG, revoked=True)
    expired = await add_api_key(bus, ORG, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    still_valid = await add_api_key(bus, ORG, expires_at=datetime.now(UTC) + timedelta(hours=1))
    for token, status in ((revoked, 401), (expired, 401), (still_valid, 200)):
        async with http.get(f"{proxy_url}/toolbox/{sandbox}/version", headers=bearer(token)) as response:
            assert response.status == status, token


@pytest.mark.parametrize(
    "permissions", [(), ("delete:sandboxes",), ("read:volumes", "write:snapshots", "delete:sandboxes")]
)
async def test_toolbox_needs_write_sandboxes(
    http: aiohttp.ClientSession,
    proxy_url: str,
    bus: Bus,
    sandbox: str,
    fake_runner: tuple[FakeRunner, str],
    permissions: tuple[str, ...],
) -> None:
    """As Daytona's toolbox controller: a key without write:sandboxes gets 403 on every toolbox call, on
    its own organization's sandbox and on any other id alike (the 403 reveals nothing of other tenants)."""
    limited = await add_api_key(bus, ORG, permissions=permissions)
    other_orgs_sandbox = await add_route(bus, fake_runner[1], organization_id=OTHER_ORG)
    for target in (sandbox, other_orgs_sandbox, str(uuid.uuid4())):
        for method, path in (("GET", "/version"), ("POST", "/process/execute"), ("GET", "/files/download")):
            url = f"{proxy_url}/toolbox/{target}{path}"
            async with http.request(method, url, headers=bearer(limited)) as response:
                assert response.status == 403, (target, path)
                assert "write:sandboxes" in str((await error_body(response))["message"])
    # With the scope, the same key shape goes through.
    writer = await add_api_key(bus, ORG, permissions=(*permissions, "write:sandboxes"))
    async with http.get(f"{proxy_url}/toolbox/{sandbox}/version", headers=bearer(writer)) as response:
        assert response.status == 200


async def test_signed_url_without_bearer_is_401_until_implemented(
    http: aiohttp.ClientSession, proxy_url: str, sandbox: str
) -> None:
    url = f"{proxy_url}/toolbox/{sandbox}/files/download?path=a.txt&expires=0&signature=v1_abc"
    async with http.get(url) as response:
        assert response.status == 401
        await error_body(response)


async def test_other_organizations_sandbox_is_404(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str], api_key: str
) -> None:
    foreign = await add_route(bus, fake_runner[1], organization_id=OTHER_ORG)
    for sandbox_id in (foreign, str(uuid.uuid4()), "not..valid"):
        async with http.get(f"{proxy_url}/toolbox/{sandbox_id}/version", headers=bearer(api_key)) as response:
            assert response.status == 404
            body = await error_body(response)
            assert body["message"] == f"sandbox {sandbox_id} not found"
            assert body["error"] == "Not Found"


async def test_stopped_sandbox_is_409(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str], api_key: str
) -> None:
    stopped = await add_route(bus, fake_runner[1], state=SandboxState.STOPPED)
    async with http.get(f"{proxy_url}/toolbox/{stopped}/version", headers=bearer(api_key)) as response:
        assert response.status == 409
        body = await error_body(response)
        assert body["message"] == "sandbox is not running (state: stopped)"


@pytest.mark.parametrize(
    "path",
    [
        "/containers/json",
        "/v4.0.0/libpod/info",
        "/files/../../containers/json",
        "/files/%2e%2e/%2e%2e/containers/json",
        "//version",
        "/",
    ],
)
async def test_only_toolbox_routes_reach_the_runner(
    http: aiohttp.ClientSession,
    proxy_url: str,
    fake_runner: tuple[FakeRunner, str],
    sandbox: str,
    api_key: str,
    path: str,
) -> None:
    """Issue #7: the proxy relays the toolbox API, not whatever path a caller makes up."""
    runner, _ = fake_runner
    before = len(runner.requests)
    url = aiohttp.client.URL(f"{proxy_url}/toolbox/{sandbox}{path}", encoded=True)
    async with http.get(url, headers=bearer(api_key)) as response:
        assert response.status == 404
        assert "no route" in str((await error_body(response))["message"])
    async with http.put(f"{proxy_url}/toolbox/{sandbox}/version", headers=bearer(api_key)) as response:
        assert response.status == 405
    assert len(runner.requests) == before


async def test_forwards_method_raw_path_query_and_headers(
    http: aiohttp.ClientSession,
    proxy_url: str,
    fake_runner: tuple[FakeRunner, str],
    sandbox: str,
    api_key: str,
) -> None:
    runner, _ = fake_runner
    query = "path=x%2Fy%20z&multi=1&multi=2&star=%2A"
    url = f"{proxy_url}/toolbox/{sandbox}/process/session/a%2Fb%20c/exec?{query}"
    headers = {**bearer(api_key), "X-Daytona-Source": "sdk-python", "Connection": "keep-alive, X-Drop-Me"}
    headers["X-Drop-Me"] = "hop-by-hop via Connection"
    # `POST /env` arrives without a Content-Type and must leave the proxy without one too.
    async with http.post(
        aiohttp.client.URL(url, encoded=True),
        data=b'{"set":{"A":"1"}}',
        headers=headers,
        skip_auto_headers=["Content-Type"],
    ) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["method"] == "POST"
    assert echoed["raw_path"] == f"/sandboxes/{sandbox}/toolbox/process/session/a%2Fb%20c/exec"
    assert echoed["raw_query"] == "path=x%2Fy%20z&multi=1&multi=2&star=%2A"
    assert echoed["content_type"] is None
    assert echoed["body"] == '{"set":{"A":"1"}}'
    seen = runner.requests[-1]["headers"]
    assert isinstance(seen, dict)
    assert seen["Authorization"] == f"Bearer {RUNNER_TOKEN}"
    assert seen["X-Daytona-Source"] == "sdk-python"
    assert "X-Drop-Me" not in seen


async def test_route_written_just_now_is_found(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str], api_key: str
) -> None:
    # No wait between the KV write and the request: the proxy must read through on a cache miss.
    for _ in range(5):
        fresh = await add_route(bus, fake_runner[1])
        async with http.get(f"{proxy_url}/toolbox/{fresh}/version", headers=bearer(api_key)) as response:
            assert response.status == 200


async def test_route_changes_reach_the_proxy(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str], api_key: str
) -> None:
    sandbox_id = await add_route(bus, fake_runner[1])
    async with http.get(f"{proxy_url}/toolbox/{sandbox_id}/version", headers=bearer(api_key)) as response:
        assert response.status == 200
    routes = await bus.kv(channels.ROUTES)
    stopped = SandboxRoute(
        sandbox_id=sandbox_id,
        organization_id=ORG,
        runner_id="runner-fake",
        runner_url=fake_runner[1],
        state=SandboxState.STOPPED,
    )
    await kv_put(routes, sandbox_id, stopped)
    assert await _eventually_status(http, f"{proxy_url}/toolbox/{sandbox_id}/version", api_key, 409)
    await kv_delete(routes, sandbox_id)
    assert await _eventually_status(http, f"{proxy_url}/toolbox/{sandbox_id}/version", api_key, 404)


async def _eventually_status(http: aiohttp.ClientSession, url: str, api_key: str, status: int) -> bool:
    async def answered() -> bool:
        async with http.get(url, headers=bearer(api_key)) as response:
            return response.status == status

    return await wait_until_async(answered, f"{url} never answered {status}")


async def test_unreachable_runner_is_502(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, api_key: str
) -> None:
    from tests.conftest import free_port

    orphan = await add_route(bus, f"http://127.0.0.1:{free_port()}")
    async with http.get(f"{proxy_url}/toolbox/{orphan}/version", headers=bearer(api_key)) as response:
        assert response.status == 502
        await error_body(response)


async def test_streams_10_mib_upload_byte_identical(
    http: aiohttp.ClientSession, proxy_url: str, sandbox: str, api_key: str
) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    url = f"{proxy_url}/toolbox/{sandbox}/files/upload-v2?path=10mib.bin"
    async with http.post(url, data=payload, headers=bearer(api_key)) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "chunked": None}

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(payload), 1024 * 1024):
            yield payload[offset : offset + 1024 * 1024]

    # Chunked upload without Content-Length (how the SDK streams files) stays chunked end to end.
    async with http.post(url, data=chunks(), headers=bearer(api_key)) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer == {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "chunked": "chunked",
    }


async def test_streams_10_mib_download_byte_identical(
    http: aiohttp.ClientSession,
    proxy_url: str,
    fake_runner: tuple[FakeRunner, str],
    sandbox: str,
    api_key: str,
) -> None:
    runner, _ = fake_runner
    async with http.get(
        f"{proxy_url}/toolbox/{sandbox}/files/download?path=10mib.bin", headers=bearer(api_key)
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(runner.download))
        assert response.headers["Content-Type"] == "application/octet-stream"
        received = await response.read()
    assert hashlib.sha256(received).digest() == hashlib.sha256(runner.download).digest()


async def test_websocket_passthrough(
    http: aiohttp.ClientSession, proxy_url: str, sandbox: str, api_key: str
) -> None:
    url = f"{proxy_url}/toolbox/{sandbox}/process/pty/pty1/connect?cols=80&rows=24"
    async with http.ws_connect(
        url, headers=bearer(api_key), protocols=("X-Daytona-Pty-Exit-Control", "X-Daytona-Pty-Envs~e30")
    ) as ws:
        assert ws.protocol == "X-Daytona-Pty-Exit-Control"
        assert (await ws.receive_str(timeout=5)) == '{"type":"control","status":"connected"}'
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=5)) == "echo:hello"
        await ws.send_bytes(b"\x00\x01binary")
        assert (await ws.receive_bytes(timeout=5)) == b"echo:\x00\x01binary"
        await ws.send_str("exit")
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == 1011
        assert closing.extra == '{"exitCode":3}'


async def test_browser_websocket_key_travels_as_a_subprotocol_the_runner_never_sees(
    http: aiohttp.ClientSession,
    proxy_url: str,
    sandbox: str,
    api_key: str,
    fake_runner: tuple[FakeRunner, str],
) -> None:
    """Browsers cannot set Authorization on a WebSocket: the dashboard offers `Tidepool-Bearer~<key>`."""
    runner, _ = fake_runner
    url = f"{proxy_url}/toolbox/{sandbox}/process/pty/pty1/connect?cols=80&rows=24"
    async with http.ws_connect(
        url,
        protocols=("X-Daytona-Pty-Exit-Control", f"Tidepool-Bearer~{api_key}"),
        headers={"Origin": "http://x"},
    ) as ws:
        assert ws.protocol == "X-Daytona-Pty-Exit-Control"
        assert (await ws.receive_str(timeout=5)) == '{"type":"control","status":"connected"}'
        await ws.send_str("hi")
        assert (await ws.receive_str(timeout=5)) == "echo:hi"
    offered, authorization = runner.websocket_handshakes[-1]
    assert offered == "X-Daytona-Pty-Exit-Control"
    assert api_key not in authorization and authorization == f"Bearer {RUNNER_TOKEN}"
    with pytest.raises(aiohttp.WSServerHandshakeError) as wrong:
        await http.ws_connect(url, protocols=("X-Daytona-Pty-Exit-Control", "Tidepool-Bearer~tp_wrong"))
    assert wrong.value.status == 401


async def test_toolbox_cors_for_the_dashboard(
    http: aiohttp.ClientSession, proxy_url: str, sandbox: str
) -> None:
    """Preflights are answered without a key; answers carry `*` and never credentials."""
    url = f"{proxy_url}/toolbox/{sandbox}/files/upload-v2?path=/a"
    preflight_headers = {
        "Origin": "http://dashboard.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    async with http.options(url, headers=preflight_headers) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["Access-Control-Allow-Headers"] == "authorization"
        assert "Access-Control-Allow-Credentials" not in response.headers
    async with http.post(url, headers={"Origin": "http://dashboard.example"}) as response:
        assert response.status == 401
        assert response.headers["Access-Control-Allow-Origin"] == "*"
    async with http.options(url) as response:  # not a preflight: a toolbox call, which needs a key
        assert response.status == 401


async def test_websocket_needs_auth_and_keeps_rejection_status(
    http: aiohttp.ClientSession, proxy_url: str, sandbox: str, api_key: str
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as unauthenticated:
        await http.ws_connect(f"{proxy_url}/toolbox/{sandbox}/process/pty/pty1/connect")
    assert unauthenticated.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as rejected:
        await http.ws_connect(
            f"{proxy_url}/toolbox/{sandbox}/process/pty/busy/connect", headers=bearer(api_key)
        )
    assert rejected.value.status == 409
