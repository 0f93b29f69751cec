"""Issue #11 in headless Chromium (Playwright, Debian's chromium, as tests/integration/test_dashboard.py): the
web terminal on port 22222 of a sandbox's preview (xterm.js over a PTY in the sandbox, relayed by the proxy),
and the preview warning page with its 24-hour cookie.

Every request goes to the URLs the API returned (`http://{port}-{id}.localhost:{proxy port}`; Chromium
resolves `*.localhost` to loopback itself). Screenshots go to `test-artifacts/previews/` (gitignored).
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daytona import Daytona, Sandbox, SessionExecuteRequest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "previews"
TERMINAL_PORT = 22222
WEB_PORT = 3000
WWW = "/home/daytona/www"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `make host` (scripts/setup-host.sh)")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's own sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    daytona = Daytona()
    created = daytona.create()
    try:
        created.fs.upload_file(b"hello from the sandbox\n", f"{WWW}/hello.txt")
        session = f"web-{uuid.uuid4().hex[:6]}"
        created.process.create_session(session)
        created.process.execute_session_command(
            session,
            SessionExecuteRequest(command=f"cd {WWW} && python3 -m http.server {WEB_PORT}", run_async=True),
        )
        probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {WEB_PORT}), 1)\""
        wait_until(lambda: created.process.exec(probe).exit_code == 0, "the web server did not start")
        yield created
    finally:
        daytona.delete(created)


def new_page(browser: Browser) -> Page:
    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", lambda message: print(f"console {message.type}: {message.text}"))
    page.on("pageerror", lambda error: print(f"page error: {error}"))
    return page


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_the_web_terminal_runs_a_command_in_the_sandbox(browser: Browser, sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(TERMINAL_PORT)
    page = new_page(browser)
    # No credentials: refused (port 22222 is reserved).
    refused = page.goto(f"{link.url}/")
    assert refused is not None and refused.status == 401
    opened = page.goto(f"{link.url}/?DAYTONA_SANDBOX_AUTH_KEY={link.token}")
    assert opened is not None and opened.status == 200
    expect(page.get_by_role("status")).to_have_text("Terminal: connected")
    marker = uuid.uuid4().hex[:8]
    page.locator(".xterm").click()
    page.keyboard.type(f"echo {marker} > /tmp/web-terminal && echo $((6*7))-{marker}\n")
    expect(page.locator(".xterm-rows")).to_contain_text(f"42-{marker}")
    shot(page, "web-terminal")
    # It ran in the sandbox, as its user.
    written = sandbox.process.exec("cat /tmp/web-terminal && stat -c %U /tmp/web-terminal").result.split()
    assert written == [marker, "daytona"]
    page.context.close()


def test_the_web_terminal_refuses_strangers_even_on_a_public_sandbox(
    browser: Browser, sandbox: Sandbox, tenant: Daytona
) -> None:
    link = sandbox.get_preview_link(TERMINAL_PORT)
    socket_url = link.url.replace("http://", "ws://", 1) + "/__tidepool/terminal/pty"
    sandbox.set_public(True)
    try:
        web = sandbox.get_preview_link(WEB_PORT)
        wait_until(
            lambda: httpx.get(f"{web.url}/hello.txt", timeout=30).status_code == 200,
            "the public preview stayed closed",
        )
        assert httpx.get(f"{link.url}/", timeout=30).status_code == 401
        with pytest.raises(InvalidStatus) as anonymous:
            connect(socket_url, open_timeout=30)
        assert anonymous.value.response.status_code == 401
        theirs = tenant.create()
        try:
            their_token = theirs.get_preview_link(TERMINAL_PORT).token
        finally:
            tenant.delete(theirs)
        with pytest.raises(InvalidStatus) as stranger:
            connect(f"{socket_url}?DAYTONA_SANDBOX_AUTH_KEY={their_token}", open_timeout=30)
        assert stranger.value.response.status_code == 404
        # Only the terminal lives on 22222: no other path reaches into the sandbox.
        other = httpx.get(
            f"{link.url}/hello.txt", headers={"X-Daytona-Preview-Token": link.token}, timeout=30
        )
        assert other.status_code == 404
    finally:
        sandbox.set_public(False)

    def terminals() -> list[str]:
        return [pty.id for pty in sandbox.process.list_pty_sessions() if pty.id.startswith("web-terminal-")]

    # With the token, the socket is a shell: a PTY of the sandbox while it is open.
    with connect(f"{socket_url}?DAYTONA_SANDBOX_AUTH_KEY={link.token}", open_timeout=30) as shell:
        shell.send("echo $((40+2))-socket\n")
        seen = ""
        deadline = time.monotonic() + 60
        while "42-socket" not in seen and time.monotonic() < deadline:
            message = shell.recv(timeout=60)
            seen += message if isinstance(message, str) else message.decode(errors="replace")
        assert "42-socket" in seen
        assert terminals(), "the open web terminal has no PTY in the sandbox"

    # A closed terminal's shell is gone too (a PTY outlives its clients unless the proxy ends it).
    wait_until(lambda: not terminals(), "the web terminal's shells outlived their pages")


def test_the_preview_warning_page_and_its_cookie(browser: Browser, sandbox: Sandbox) -> None:
    link = sandbox.get_preview_link(WEB_PORT)
    url = f"{link.url}/hello.txt?DAYTONA_SANDBOX_AUTH_KEY={link.token}"
    page = new_page(browser)
    page.goto(url)
    expect(page.get_by_role("heading")).to_have_text("You are about to open a sandbox preview")
    shot(page, "preview-warning")
    page.get_by_role("link", name="Continue to the preview").click()
    expect(page.locator("body")).to_contain_text("hello from the sandbox")
    accepted = [
        cookie for cookie in page.context.cookies() if cookie["name"] == "daytona-preview-page-accepted"
    ]
    assert len(accepted) == 1 and accepted[0]["value"] == "true" and accepted[0]["httpOnly"]
    assert 86_000 < accepted[0]["expires"] - time.time() <= 86_400
    # The cookie holds: straight to the app from now on.
    page.goto(url)
    expect(page.locator("body")).to_contain_text("hello from the sandbox")
    page.context.close()
    # A browser without the cookie is warned again.
    fresh = new_page(browser)
    fresh.goto(url)
    expect(fresh.get_by_role("heading")).to_have_text("You are about to open a sandbox preview")
    fresh.context.close()
