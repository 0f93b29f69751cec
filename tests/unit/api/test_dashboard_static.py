"""The API serves the dashboard's committed build at /dashboard (issue #16): no key, no Node at run time."""

from __future__ import annotations

import re
from types import SimpleNamespace

import httpx

from tidepool_api.app import DASHBOARD_DIR, create_app


def client() -> httpx.AsyncClient:
    app = create_app(SimpleNamespace(settings=SimpleNamespace(api_max_body_bytes=1024)))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


async def test_the_built_dashboard_is_committed_and_served() -> None:
    assert (DASHBOARD_DIR / "index.html").is_file(), "run `make dashboard` and commit its output"
    async with client() as http:
        bare = await http.get("/dashboard")
        assert bare.status_code in (302, 307) and bare.headers["location"] == "/dashboard/"
        page = await http.get("/dashboard/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        scripts = re.findall(r'src="(/dashboard/assets/[^"]+\.js)"', page.text)
        assert scripts, page.text
        script = await http.get(scripts[0])
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert (await http.get("/dashboard/assets/missing.js")).status_code == 404
