"""Preview requests through the proxy in-process (real nats-server, fake runner): who passes, what the
runner gets, signed URLs, CORS."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tests.polling import wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.models import PreviewAccess, SignedPreview
from tidepool_contracts.states import SandboxState
from tidepool_runtime.broker import Bus, kv_delete, kv_put

from .conftest import RUNNER_TOKEN, FakeRunner
from .test_proxy import ORG, OTHER_ORG, add_api_key, add_route

TOKEN = "preview-token-of-the-sandbox"


async def add_preview(
    bus: Bus, runner_url: str, *, public: bool = False, state: SandboxState = SandboxState.STARTED
) -> str:
    sandbox_id = await add_route(bus, runner_url, state=state)
    access = PreviewAccess(
        sandbox_id=sandbox_id,
        organization_id=ORG,
        public=public,
        token_hash=hashlib.sha256(TOKEN.encode()).hexdigest(),
    )
    await kv_put(await bus.kv(channels.PREVIEWS), sandbox_id, access)
    return sandbox_id


async def add_signed(bus: Bus, sandbox_id: str, port: int, expires_in: float) -> str:
    token = uuid.uuid4().hex  # 32 of [0-9a-f]: no `-`, like the API's base32 tokens
    record = SignedPreview(
        sandbox_id=sandbox_id,
        organization_id=ORG,
        port=port,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )
    await kv_put(await bus.kv(channels.SIGNED_PREVIEWS), hashlib.sha256(token.encode()).hexdigest(), record)
    return token


@pytest.fixture
async def private(bus: Bus, fake_runner: tuple[FakeRunner, str]) -> str:
    return await add_preview(bus, fake_runner[1])


async def fetch(
    http: aiohttp.ClientSession, proxy_url: str, label: str, path: str = "/", port: int = 3000, **headers: str
) -> tuple[int, dict[str, object], CIMultiDictProxy[str]]:
    async with http.get(
        f"{proxy_url}{path}", headers={"Host": f"{port}-{label}.localhost", **headers}
    ) as response:
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body, response.headers


async def test_who_passes_a_private_preview(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, private: str
) -> None:
    own_key = await add_api_key(bus, ORG)
    other_key = await add_api_key(bus, OTHER_ORG)
    revoked = await add_api_key(bus, ORG, revoked=True)
    cases = [
        ({}, 401),
        ({"X-Daytona-Preview-Token": TOKEN}, 200),
        ({"X-Daytona-Preview-Token": "wrong"}, 404),
        ({"Authorization": f"Bearer {own_key}"}, 200),
        ({"Authorization": f"Bearer {other_key}"}, 404),
        ({"Authorization": f"Bearer {revoked}"}, 401),
        ({"Authorization": "Bearer not-a-key"}, 401),
    ]
    for headers, status in cases:
        assert (await fetch(http, proxy_url, private, **headers))[0] == status, headers
    status, _, _ = await fetch(http, proxy_url, private, f"/?DAYTONA_SANDBOX_AUTH_KEY={TOKEN}")
    assert status == 200
    assert (await fetch(http, proxy_url, str(uuid.uuid4()), **{"X-Daytona-Preview-Token": TOKEN}))[0] == 404


async def test_the_runner_gets_the_request_without_our_credentials(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, private: str
) -> None:
    status, body, _ = await fetch(
        http,
        proxy_url,
        private,
        "/a%2Fb/c?x=1&DAYTONA_SANDBOX_AUTH_KEY=" + TOKEN,
        **{"X-Daytona-Skip-Last-Activity-Update": "true", "X-Daytona-Disable-CORS": "true"},
    )
    assert status == 200
    assert body["raw_path"] == f"/sandboxes/{private}/ports/3000/a%2Fb/c"
    assert body["raw_query"] == "x=1"
    headers = body["headers"]
    assert isinstance(headers, dict)
    assert headers["X-Daytona-Authorization"] == f"Bearer {RUNNER_TOKEN}"
    assert headers["X-Forwarded-Host"] == f"3000-{private}.localhost"
    assert headers["X-Daytona-Skip-Last-Activity-Update"] == "true"  # the runner reads and drops it
    assert "X-Daytona-Disable-CORS" not in headers
    # A bearer key that authenticated is not passed on; on a public sandbox the app's own one is.
    key = await add_api_key(bus, ORG)
    _, body, _ = await fetch(http, proxy_url, private, Authorization=f"Bearer {key}")
    assert "Authorization" not in body["headers"]  # type: ignore[operator]
    _, body, _ = await fetch(
        http, proxy_url, private, **{"X-Daytona-Preview-Token": TOKEN, "X-Other": "kept"}
    )
    assert "X-Daytona-Preview-Token" not in body["headers"]  # type: ignore[operator]
    assert body["headers"]["X-Other"] == "kept"  # type: ignore[index]


async def test_public_previews_and_reserved_ports(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str]
) -> None:
    public = await add_preview(bus, fake_runner[1], public=True)
    status, body, _ = await fetch(http, proxy_url, public, Authorization="Basic YXBwOnNlY3JldA==")
    assert status == 200
    assert body["headers"]["Authorization"] == "Basic YXBwOnNlY3JldA=="  # type: ignore[index]
    for port in (22222, 2280, 33333):
        assert (await fetch(http, proxy_url, public, port=port))[0] == 401
        assert (await fetch(http, proxy_url, public, port=port, **{"X-Daytona-Preview-Token": TOKEN}))[
            0
        ] == 200


async def test_stopped_and_deleted_sandboxes(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str]
) -> None:
    stopped = await add_preview(bus, fake_runner[1], state=SandboxState.STOPPED)
    status, body, _ = await fetch(http, proxy_url, stopped, **{"X-Daytona-Preview-Token": TOKEN})
    assert status == 503 and "start it" in str(body["message"])
    deleted = await add_preview(bus, fake_runner[1])
    await kv_delete(await bus.kv(channels.PREVIEWS), deleted)

    async def gone() -> bool:
        return (await fetch(http, proxy_url, deleted, **{"X-Daytona-Preview-Token": TOKEN}))[0] == 404

    await wait_until_async(gone, "a deleted sandbox's preview still answers")


async def test_signed_previews(http: aiohttp.ClientSession, proxy_url: str, bus: Bus, private: str) -> None:
    token = await add_signed(bus, private, 3000, 60)
    assert (await fetch(http, proxy_url, token))[0] == 200
    assert (await fetch(http, proxy_url, token, port=3001))[0] == 404  # bound to its port
    expired = await add_signed(bus, private, 3000, -1)
    assert (await fetch(http, proxy_url, expired))[0] == 410
    assert (await fetch(http, proxy_url, uuid.uuid4().hex))[0] == 404


async def test_cors_echoes_only_the_sandboxs_own_origins(
    http: aiohttp.ClientSession, proxy_url: str, private: str
) -> None:
    auth = {"X-Daytona-Preview-Token": TOKEN}
    own = f"http://5173-{private}.localhost"
    _, _, headers = await fetch(http, proxy_url, private, Origin=own, **auth)
    assert headers["Access-Control-Allow-Origin"] == own
    assert headers["Access-Control-Allow-Credentials"] == "true"
    _, _, headers = await fetch(http, proxy_url, private, Origin="https://evil.example", **auth)
    assert "Access-Control-Allow-Origin" not in headers
    # The app's own `*` never goes out with credentials.
    _, _, headers = await fetch(
        http, proxy_url, private, "/?app_cors=star", Origin="https://x.example", **auth
    )
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers


async def test_warning_page_for_browsers(http: aiohttp.ClientSession, proxy_url: str, private: str) -> None:
    browser = {
        "User-Agent": "Mozilla/5.0",
        "Accept": "text/html",
        "X-Daytona-Preview-Token": TOKEN,
    }
    status, _, headers = await fetch(http, proxy_url, private, **browser)
    assert status == 200 and headers["X-Daytona-Preview-Warning"] == "true"
    status, _, _ = await fetch(
        http, proxy_url, private, **browser, **{"X-Daytona-Skip-Preview-Warning": "true"}
    )
    assert status == 200
    status, body, _ = await fetch(
        http, proxy_url, private, **browser, Cookie="daytona-preview-page-accepted=true"
    )
    assert status == 200 and body["raw_path"].endswith("/ports/3000/")  # type: ignore[union-attr]


async def test_port_22222_is_the_web_terminal_behind_credentials(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str]
) -> None:
    runner, runner_url = fake_runner
    public = await add_preview(bus, runner_url, public=True)
    terminal = {"Host": f"22222-{public}.localhost"}
    # The static files are the same for every sandbox: served to anyone (even for no sandbox at all).
    for name, kind in (
        ("xterm.js", "text/javascript"),
        ("terminal.js", "text/javascript"),
        ("xterm.css", "text/css"),
    ):
        async with http.get(f"{proxy_url}/__tidepool/terminal/{name}", headers=terminal) as answer:
            assert answer.status == 200 and answer.content_type == kind
    async with http.get(f"{proxy_url}/__tidepool/terminal/../../etc/passwd", headers=terminal) as answer:
        assert answer.status == 401
    # The page: credentials even on a public sandbox; only `/` and the socket live on 22222.
    assert (await fetch(http, proxy_url, public, port=22222))[0] == 401
    status, _, headers = await fetch(
        http, proxy_url, public, f"/?DAYTONA_SANDBOX_AUTH_KEY={TOKEN}", port=22222
    )
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert (await fetch(http, proxy_url, public, "/x", port=22222, **{"X-Daytona-Preview-Token": TOKEN}))[
        0
    ] == 404
    socket = f"{proxy_url}/__tidepool/terminal/pty?cols=100&rows=30"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(socket, headers=terminal)
    assert refused.value.status == 401

    before = len(runner.requests)
    async with http.ws_connect(
        f"{socket}&DAYTONA_SANDBOX_AUTH_KEY={TOKEN}",
        headers=terminal,
        protocols=("X-Daytona-Pty-Exit-Control",),
    ) as shell:
        assert shell.protocol == "X-Daytona-Pty-Exit-Control"
        assert "connected" in (await shell.receive_str())
        await shell.send_str("ls")
        assert await shell.receive_str() == "echo:ls"
    opened = runner.requests[before]
    assert str(opened["raw_path"]).endswith("/toolbox/process/pty/create-connect")
    query = str(opened["raw_query"])
    assert "cols=100" in query and "rows=30" in query and "DAYTONA_SANDBOX_AUTH_KEY" not in query
    session = query.split("id=", 1)[1].split("&", 1)[0]
    assert session.startswith("web-terminal-")
    opened_headers = opened["headers"]
    assert isinstance(opened_headers, dict) and opened_headers["Authorization"] == f"Bearer {RUNNER_TOKEN}"

    async def deleted() -> bool:
        return any(
            request["method"] == "DELETE" and str(request["raw_path"]).endswith(f"/process/pty/{session}")
            for request in runner.requests[before:]
        )

    await wait_until_async(deleted, "the closed terminal's shell was not deleted")
