"""The dashboard (issue #16) in headless Chromium, driven by Playwright against a real stack: sign in with a
key, create a sandbox, see its state change live (Socket.IO, no reload), run a command in its web terminal
(xterm.js over the toolbox PTY WebSocket, through the proxy), upload and download a file (toolbox files API,
cross-origin), delete it; another organization's key sees none of it.

Chromium is Debian's (`scripts/setup-host.sh`), launched by path: no browser is ever downloaded. Screenshots
of each step go to `test-artifacts/dashboard/` (gitignored).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.integration.stackthread import StackThread

pytestmark = [pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
# Generous: a sandbox's first start on a cold runner pulls and unpacks its image.
STATE_TIMEOUT_MS = 180_000


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
def own_key(stack: StackThread) -> str:
    """A fresh organization's key, so the list holds only what this test makes."""
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"dash-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["apiKey"]["value"])


def dashboard_url(stack: StackThread) -> str:
    return stack.api_url.removesuffix("/api") + "/dashboard/"


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(browser: Browser, stack: StackThread, key: str) -> Page:
    page = browser.new_context(accept_downloads=True).new_page()
    # Shown with a failure: what the page logged and which requests failed.
    page.on("console", lambda message: print(f"console {message.type}: {message.text}"))
    page.on("pageerror", lambda error: print(f"page error: {error}"))
    page.on("requestfailed", lambda request: print(f"request failed: {request.method} {request.url}"))
    page.goto(dashboard_url(stack))
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Sandboxes")).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="live")).to_have_text("live")
    return page


def test_the_dashboard_runs_a_sandbox_end_to_end(
    browser: Browser, stack: StackThread, own_key: str, tenant_key: str
) -> None:
    page = sign_in(browser, stack, own_key)
    shot(page, "01-signed-in")
    assert page.evaluate("sessionStorage.getItem('tidepool.apiKey')") == own_key

    name = f"dash-{uuid.uuid4().hex[:8]}"
    form = page.get_by_role("form", name="Create sandbox")
    form.get_by_label("Name").fill(name)
    form.get_by_label("Labels (k=v, …)").fill("suite=dashboard")
    form.get_by_role("button", name="Create sandbox").click()
    row = page.locator("[role=row]", has_text=name)
    expect(row).to_be_visible(timeout=STATE_TIMEOUT_MS)
    sandbox_id = row.get_attribute("data-sandbox-id")
    assert sandbox_id
    headers = {"Authorization": f"Bearer {own_key}"}
    try:
        expect(row.locator("[data-state]")).to_have_text("started", timeout=STATE_TIMEOUT_MS)
        expect(row).to_contain_text("suite=dashboard")
        shot(page, "02-created-started")

        # A change made elsewhere shows up without a reload: Socket.IO's sandbox.state.updated.
        stopped = httpx.post(f"{stack.api_url}/sandbox/{sandbox_id}/stop", headers=headers, timeout=120)
        assert stopped.status_code == 200, stopped.text
        expect(row.locator("[data-state]")).to_have_text("stopped", timeout=STATE_TIMEOUT_MS)
        detail = page.get_by_role("complementary", name=f"Sandbox {name}")
        detail.get_by_role("button", name="Start", exact=True).click()
        expect(row.locator("[data-state]")).to_have_text("started", timeout=STATE_TIMEOUT_MS)
        expect(detail.get_by_role("list", name="Events")).to_contain_text("stopped")
        shot(page, "03-restarted-live")

        # The web terminal: keys typed in xterm.js reach the sandbox's shell, its output comes back.
        detail.get_by_role("tab", name="Terminal").click()
        expect(detail.get_by_text("Terminal: connected")).to_be_visible(timeout=60_000)
        page.locator(".xterm-helper-textarea").focus()
        page.keyboard.type("echo dash-$((6*7)) > /tmp/dash.txt; cat /tmp/dash.txt\n")
        expect(page.locator(".xterm-rows")).to_contain_text("dash-42", timeout=60_000)
        shot(page, "04-terminal")

        # Files: upload through the browser, see it listed, download it back.
        detail.get_by_role("tab", name="Files").click()
        expect(detail.get_by_label("Folder")).to_have_value(re.compile("^/"))  # the work dir, once known
        expect(detail.get_by_label("Upload file")).to_be_enabled()
        content = f"hello from the dashboard {uuid.uuid4().hex}\n".encode()
        detail.get_by_label("Upload file").set_input_files(
            files=[{"name": "hello.txt", "mimeType": "text/plain", "buffer": content}]
        )
        expect(detail.get_by_role("list", name="Files")).to_contain_text("hello.txt", timeout=60_000)
        with page.expect_download() as download_info:
            detail.get_by_role("button", name="Download hello.txt").click()
        downloaded = download_info.value
        assert Path(downloaded.path()).read_bytes() == content
        assert downloaded.suggested_filename == "hello.txt"
        shot(page, "05-files")

        # Another organization's key sees nothing of it, in the dashboard or behind it.
        theirs = sign_in(browser, stack, tenant_key)
        expect(theirs.get_by_role("table", name="Sandboxes")).to_be_visible()
        expect(theirs.locator(".count[data-loaded=true]")).to_have_text("0")  # loaded, and empty
        expect(theirs.locator("[role=row]", has_text=name)).to_have_count(0)
        expect(theirs.locator("[role=row][data-sandbox-id]")).to_have_count(0)
        shot(theirs, "06-other-tenant")
        tenant_headers = {"Authorization": f"Bearer {tenant_key}"}
        assert httpx.get(f"{stack.api_url}/sandbox/{sandbox_id}", headers=tenant_headers).status_code == 404
        toolbox = f"{stack.proxy_url}/toolbox/{sandbox_id}/files?path=/tmp"
        assert httpx.get(toolbox, headers=tenant_headers).status_code == 404
        theirs.context.close()

        page.on("dialog", lambda dialog: dialog.accept())
        detail.get_by_role("button", name="Delete").click()
        expect(row).to_have_count(0, timeout=STATE_TIMEOUT_MS)
        shot(page, "07-deleted")

        # Keyboard only: the sections are buttons; the audit log names what was done to the sandbox.
        page.get_by_role("button", name="Audit log").focus()
        page.keyboard.press("Enter")
        expect(page.get_by_role("table", name=re.compile("^Audit log"))).to_contain_text(sandbox_id)
        shot(page, "08-audit-log")
    except BaseException:
        shot(page, "failed")
        raise
    finally:
        httpx.delete(f"{stack.api_url}/sandbox/{sandbox_id}", headers=headers, timeout=120)
        page.context.close()


def test_the_toolbox_answers_browsers_across_origins(stack: StackThread, own_key: str) -> None:
    """The dashboard (API origin) calls the toolbox (proxy origin): preflights pass without a key, answers
    are readable, and a WebSocket's key subprotocol authenticates (the runner never sees it)."""
    url = f"{stack.proxy_url}/toolbox/some-sandbox/files"
    preflight = httpx.options(
        url,
        headers={
            "Origin": "http://localhost:1",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    refused = httpx.get(url, headers={"Origin": "http://localhost:1"})
    assert refused.status_code == 401  # the preflight grants nothing: the call itself needs a key
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    unknown = httpx.get(url, headers={"Origin": "http://localhost:1", "Authorization": f"Bearer {own_key}"})
    assert unknown.status_code == 404
