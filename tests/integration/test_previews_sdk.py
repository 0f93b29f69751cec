"""Issue #11 (previews): a server in a sandbox reached through its preview URL, with the official SDK.

Servers run in the sandbox (`python3 -m http.server`, a stdlib WebSocket echo) started through a session's
async exec, exactly as a user would; every request comes from this machine to the URL the API returned
(`http://{port}-{id}.localhost:{proxy port}`: `*.localhost` is loopback, no DNS set-up).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from daytona import Daytona, Sandbox, SessionExecuteRequest

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

WEB_PORT = 3000
WS_PORT = 8765
SSE_PORT = 8090
TOKEN_HEADER = "X-Daytona-Preview-Token"
WWW = "/home/daytona/www"  # kept across a stop and a start

# A WebSocket echo server with nothing but the standard library (RFC 6455: handshake, masked client frames).
WS_ECHO = r"""
import base64, hashlib, socketserver, struct
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        headers = {}
        self.rfile.readline()
        while True:
            line = self.rfile.readline().strip()
            if not line:
                break
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if length < 126:
                frame = bytes([0x80 | opcode, length])
            else:
                frame = bytes([0x80 | opcode, 126]) + struct.pack("!H", length)
            self.wfile.write(frame + payload)
            if opcode == 8:
                return
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8765), Echo).serve_forever()
"""


# Server-sent events: the second event waits for a file the test creates after it has read the first, so
# the test only ends if every hop streams (a buffering hop would hold the first event back for ever).
SSE = r"""
import http.server, os, time
class Events(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        def send(data):
            event = ("data: %s\n\n" % data).encode()
            self.wfile.write(b"%X\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        send("first")
        while not os.path.exists("/home/daytona/www/go"):
            time.sleep(0.05)
        send("second")
        self.wfile.write(b"0\r\n\r\n")
http.server.ThreadingHTTPServer(("0.0.0.0", 8090), Events).serve_forever()
"""


@pytest.fixture(scope="module")
def daytona() -> Daytona:
    return Daytona()


def start_servers(sandbox: Sandbox) -> None:
    sandbox.fs.upload_file(WS_ECHO.encode(), "/home/daytona/ws_echo.py")
    sandbox.fs.upload_file(SSE.encode(), "/home/daytona/sse.py")
    for command in (
        f"cd {WWW} && python3 -m http.server {WEB_PORT}",
        "python3 /home/daytona/ws_echo.py",
        "python3 /home/daytona/sse.py",
    ):
        # One session per server: a session runs its commands one after the other.
        session = f"server-{uuid.uuid4().hex[:6]}"
        sandbox.process.create_session(session)
        sandbox.process.execute_session_command(
            session, SessionExecuteRequest(command=command, run_async=True)
        )
    for port in (WEB_PORT, WS_PORT, SSE_PORT):
        wait_until(
            lambda port=port: (
                sandbox.process.exec(
                    f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\""
                ).exit_code
                == 0
            ),
            f"nothing listens on {port} in the sandbox",
        )


@pytest.fixture(scope="module")
def sandbox(daytona: Daytona) -> Iterator[Sandbox]:
    created = daytona.create()
    try:
        created.fs.upload_file(b"hello from the sandbox\n", f"{WWW}/hello.txt")
        start_servers(created)
        yield created
    finally:
        daytona.delete(created)


def get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url, headers=headers, timeout=30)


def test_private_preview_needs_its_token_or_a_key(stack: StackThread, sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(WEB_PORT)
    port = stack.config.proxy_port
    assert link.url == f"http://{WEB_PORT}-{sandbox.id}.localhost:{port}"
    assert link.token

    assert get(f"{link.url}/hello.txt").status_code == 401
    assert get(f"{link.url}/hello.txt", **{TOKEN_HEADER: "not-the-token"}).status_code == 404
    answer = get(f"{link.url}/hello.txt", **{TOKEN_HEADER: link.token})
    assert answer.status_code == 200, answer.text
    assert answer.text == "hello from the sandbox\n"
    # The organization's API key opens it too; the token is not passed on to the app.
    by_key = get(f"{link.url}/hello.txt", Authorization=f"Bearer {stack.api_key}")
    assert by_key.status_code == 200, by_key.text
    # A custom proxy in front names the preview in X-Forwarded-Host.
    forwarded = get(
        f"{stack.proxy_url}/hello.txt",
        **{"X-Forwarded-Host": f"{WEB_PORT}-{sandbox.id}.preview.example.com", TOKEN_HEADER: link.token},
    )
    assert forwarded.status_code == 200, forwarded.text
    # A port nothing listens on: a clear 502, not a hang.
    closed = get(sandbox.get_preview_link(4999).url, **{TOKEN_HEADER: link.token})
    assert closed.status_code == 502


def test_websocket_echo_through_the_preview(sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(WS_PORT)

    async def echo() -> list[str]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(link.url + "/", headers={TOKEN_HEADER: link.token}) as ws,
        ):
            replies = []
            for text in ("hello", "x" * 5000):
                await ws.send_str(text)
                replies.append((await ws.receive(timeout=20)).data)
            return replies

    assert asyncio.run(echo()) == ["hello", "x" * 5000]

    async def refused() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(link.url + "/"):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    assert asyncio.run(refused()) == 401


def test_server_sent_events_stream_through_the_preview(sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(SSE_PORT)
    with httpx.stream("GET", f"{link.url}/events", headers={TOKEN_HEADER: link.token}, timeout=30) as events:
        assert events.status_code == 200
        assert events.headers["Content-Type"] == "text/event-stream"
        lines = events.iter_lines()
        assert next(line for line in lines if line) == "data: first"
        sandbox.fs.upload_file(b"", f"{WWW}/go")
        assert next(line for line in lines if line) == "data: second"


BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0",
    "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
}


def test_browser_warning_page_and_its_cookie(sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(WEB_PORT)
    with httpx.Client(headers={**BROWSER, TOKEN_HEADER: link.token}, timeout=30) as browser:
        page = browser.get(f"{link.url}/hello.txt")
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert "sandbox preview" in page.text
        accept = page.text.split('id="continue" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        accepted = browser.get(f"{link.url}{accept}")
        assert accepted.status_code == 303
        cookie = accepted.headers["Set-Cookie"]
        assert "daytona-preview-page-accepted=true" in cookie and "Max-Age=86400" in cookie
        assert accepted.headers["Location"] == "/hello.txt"
        # The client keeps the cookie: the app from now on.
        assert browser.get(f"{link.url}/hello.txt").text == "hello from the sandbox\n"
    skipped = get(
        f"{link.url}/hello.txt",
        **BROWSER,
        **{TOKEN_HEADER: link.token},
        **{"X-Daytona-Skip-Preview-Warning": "true"},
    )
    assert skipped.text == "hello from the sandbox\n"


def test_cors_only_for_the_sandboxs_own_origins(sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(WEB_PORT)
    own = f"http://5173-{sandbox.id}.localhost:4000"
    answer = get(f"{link.url}/hello.txt", Origin=own, **{TOKEN_HEADER: link.token})
    assert answer.headers.get("Access-Control-Allow-Origin") == own
    assert answer.headers.get("Access-Control-Allow-Credentials") == "true"
    foreign = get(f"{link.url}/hello.txt", Origin="https://evil.example", **{TOKEN_HEADER: link.token})
    assert foreign.status_code == 200
    assert "Access-Control-Allow-Origin" not in foreign.headers
    preflight = httpx.options(
        f"{link.url}/hello.txt",
        headers={"Origin": own, "Access-Control-Request-Method": "PUT"},
    )
    assert preflight.status_code == 204
    assert preflight.headers.get("Access-Control-Allow-Origin") == own
    assert preflight.headers.get("Access-Control-Allow-Origin") != "*"


def test_signed_url_works_is_expired_and_times_out(sandbox: Sandbox) -> None:
    signed = sandbox.create_signed_preview_url(WEB_PORT, expires_in_seconds=120)
    assert signed.port == WEB_PORT and signed.sandbox_id == sandbox.id
    assert signed.url.startswith(f"http://{WEB_PORT}-{signed.token}.localhost:")
    assert get(f"{signed.url}/hello.txt").text == "hello from the sandbox\n"
    # Bound to its port.
    assert get(signed.url.replace(f"{WEB_PORT}-", f"{WS_PORT}-", 1)).status_code == 404
    sandbox.expire_signed_preview_url(WEB_PORT, signed.token)
    assert get(f"{signed.url}/hello.txt").status_code == 404

    short = sandbox.create_signed_preview_url(WEB_PORT, expires_in_seconds=1)
    wait_until(lambda: get(f"{short.url}/hello.txt").status_code == 410, "signed URL never expired")
    with pytest.raises(Exception, match="expiresInSeconds"):
        sandbox.create_signed_preview_url(WEB_PORT, expires_in_seconds=86_401)


def test_public_sandbox_needs_nothing_except_on_reserved_ports(sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(WEB_PORT)
    sandbox.set_public(True)
    try:
        wait_until(lambda: get(f"{link.url}/hello.txt").status_code == 200, "public preview stays closed")
        for reserved in (22222, 2280, 33333):
            assert get(sandbox.get_preview_link(reserved).url).status_code == 401
    finally:
        sandbox.set_public(False)
    wait_until(lambda: get(f"{link.url}/hello.txt").status_code == 401, "private preview stays open")


def test_another_organization_gets_nothing(sandbox: Sandbox, tenant: Daytona, tenant_key: str) -> None:
    link = sandbox.get_preview_link(WEB_PORT)
    theirs = tenant.create()
    try:
        their_token = theirs.get_preview_link(WEB_PORT).token
        assert get(f"{link.url}/hello.txt", Authorization=f"Bearer {tenant_key}").status_code == 404
        assert get(f"{link.url}/hello.txt", **{TOKEN_HEADER: their_token}).status_code == 404
        their_signed = theirs.create_signed_preview_url(WEB_PORT, expires_in_seconds=60)
        their_host = their_signed.url.split("//", 1)[1].split(".", 1)[0]
        our_host_with_their_token = link.url.replace(f"{WEB_PORT}-{sandbox.id}", their_host)
        assert get(our_host_with_their_token).status_code != 200
        their_url = theirs.get_preview_link(WEB_PORT).url
    finally:
        tenant.delete(theirs)
    # A deleted sandbox's preview is gone, for its own organization's key too.
    gone = get(their_url, **{TOKEN_HEADER: their_token})
    assert gone.status_code in (404, 410), gone.text


def test_stopped_sandbox_is_unreachable_and_works_after_start(stack: StackThread, sandbox: Sandbox) -> None:
    old = sandbox.get_preview_link(WEB_PORT)
    sandbox.stop()
    stopped = get(f"{old.url}/hello.txt", Authorization=f"Bearer {stack.api_key}")
    assert stopped.status_code == 503
    assert "start" in stopped.text
    sandbox.start()
    start_servers(sandbox)
    new = sandbox.get_preview_link(WEB_PORT)
    assert new.url == old.url
    assert new.token != old.token  # the token rotates with every start
    assert get(f"{new.url}/hello.txt", **{TOKEN_HEADER: old.token}).status_code == 404
    answer = get(f"{new.url}/hello.txt", **{TOKEN_HEADER: new.token})
    assert answer.status_code == 200, answer.text


def test_port_80_is_served_by_the_sandbox_user_without_sudo(sandbox: Sandbox) -> None:
    assert sandbox.process.exec("id -u").result.strip() != "0"
    session = f"port80-{uuid.uuid4().hex[:6]}"
    sandbox.process.create_session(session)
    sandbox.process.execute_session_command(
        session,
        SessionExecuteRequest(
            command=f"id -un > /tmp/port80-user && cd {WWW} && exec python3 -m http.server 80", run_async=True
        ),
    )
    probe = "python3 -c \"import socket; socket.create_connection(('127.0.0.1', 80), 1)\""
    wait_until(lambda: sandbox.process.exec(probe).exit_code == 0, "nothing listens on port 80")
    # The server is the session's shell, exec'd: the sandbox user's, no sudo anywhere.
    assert sandbox.process.exec("cat /tmp/port80-user").result.split() == ["daytona"]
    link = sandbox.get_preview_link(80)
    assert link.url.startswith(f"http://80-{sandbox.id}.localhost:")
    answer = get(f"{link.url}/hello.txt", **{TOKEN_HEADER: link.token})
    assert answer.status_code == 200 and answer.text == "hello from the sandbox\n"
