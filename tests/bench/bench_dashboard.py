"""The dashboard's sandboxes page with 1,000 sandboxes, in headless Chromium (Debian's, via Playwright).

The 1,000 sandboxes are rows written straight into the stack's database (state `stopped`, no container),
in a fresh organization: the page only reads them through `GET /api/sandbox` (5 pages of 200), so real
containers would add nothing but minutes. They are deleted again afterwards.

Per load (BENCH_DASHBOARD_LOADS, default 10; a new browser context each time, key in sessionStorage):
- first render: navigation start → the first sandbox row in the DOM (first page of 200 shown);
- interactive: navigation start → all 1,000 listed and a click on a row has opened its detail panel.
Both are the page's own `performance.now()` readings; medians and p95 printed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import UTC, datetime

import httpx
from playwright.sync_api import sync_playwright
from sqlalchemy import create_engine, delete
from sqlmodel import Session

from tests.bench.bench_spine import summary
from tests.integration.stackthread import StackThread
from tidepool_api.db import Sandbox

ROWS = 1000
LOADS = int(os.environ.get("BENCH_DASHBOARD_LOADS", "10"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Records when the first sandbox row appears (a MutationObserver, set up before the app's script runs).
FIRST_ROW_PROBE = """
window.__firstRow = null;
new MutationObserver((_, observer) => {
  if (document.querySelector('[data-sandbox-id]')) {
    window.__firstRow = performance.now();
    observer.disconnect();
  }
}).observe(document, {childList: true, subtree: true});
"""


def insert_rows(stack: StackThread, organization_id: str) -> None:
    engine = create_engine(f"sqlite:///{stack.data_dir / 'tidepool.db'}")
    now = datetime.now(UTC)
    with Session(engine) as session:
        for index in range(ROWS):
            session.add(
                Sandbox(
                    id=str(uuid.uuid4()),
                    organization_id=organization_id,
                    name=f"bench-{index:04d}",
                    state="stopped",
                    desired_state="stopped",
                    snapshot="daytona-small",
                    image="bench",
                    labels={"bench": "dashboard", "n": str(index)},
                    cpu=1,
                    memory=1,
                    disk=3,
                    auto_stop_interval=0,
                    auto_archive_interval=0,
                    created_at=now,
                    updated_at=now,
                    last_activity_at=now,
                )
            )
        session.commit()
    engine.dispose()


def delete_rows(stack: StackThread, organization_id: str) -> None:
    engine = create_engine(f"sqlite:///{stack.data_dir / 'tidepool.db'}")
    with Session(engine) as session:
        session.exec(delete(Sandbox).where(Sandbox.organization_id == organization_id))  # type: ignore[call-overload]
        session.commit()
    engine.dispose()


def bench_dashboard(stack: StackThread) -> list[str]:
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"bench-dash-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    created.raise_for_status()
    key = created.json()["apiKey"]["value"]
    organization_id = created.json()["id"]
    insert_rows(stack, organization_id)
    url = stack.api_url.removesuffix("/api") + "/dashboard/"
    first_ms: list[float] = []
    interactive_ms: list[float] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            try:
                for attempt in range(LOADS + 1):  # the first load warms caches: not counted
                    context = browser.new_context()
                    context.add_init_script(f"sessionStorage.setItem('tidepool.apiKey', {key!r});")
                    context.add_init_script(FIRST_ROW_PROBE)
                    page = context.new_page()
                    page.goto(url)
                    page.locator(f".count[data-loaded=true]:text-is('{ROWS}')").wait_for(timeout=120_000)
                    page.locator("[data-sandbox-id] button").first.click()
                    page.locator("aside.detail").wait_for()
                    done = page.evaluate("performance.now()")
                    first = page.evaluate("window.__firstRow")
                    if attempt:
                        first_ms.append(first)
                        interactive_ms.append(done)
                    context.close()
            finally:
                browser.close()
    finally:
        delete_rows(stack, organization_id)
    return [
        summary(f"dashboard first row ({ROWS} sbx)", first_ms, 500),
        summary(f"dashboard interactive ({ROWS})", interactive_ms, 1000),
    ]
