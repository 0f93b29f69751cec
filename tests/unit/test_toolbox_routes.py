"""The toolbox route table the proxy and runner relay by is exactly the daemon's own."""

from __future__ import annotations

import sys

import pytest

from tidepool_contracts.toolbox_routes import TOOLBOX_ROUTES, toolbox_route_status
from tidepool_runtime.settings import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "services" / "daemon"))
from tidepool_daemon.context import DaemonContext
from tidepool_daemon.routes import build_router


def test_table_equals_the_daemons_router() -> None:
    router = build_router(DaemonContext.from_current_process())
    assert list(TOOLBOX_ROUTES) == router.routes()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/version"),
        ("GET", "/files/download"),
        ("GET", "/files/"),
        ("POST", "/process/session/my%20session/exec"),
        ("GET", "/process/session/s1/command/c1/logs"),
        ("get", "/version"),
    ],
)
def test_routes_of_the_api_pass(method: str, path: str) -> None:
    assert toolbox_route_status(method, path) is None


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/containers/json", 404),
        ("GET", "/v1.41/containers/json", 404),
        ("GET", "/files/../version", 404),
        ("GET", "/files/%2E%2e/version", 404),
        ("POST", "/process/session/../exec", 404),
        ("POST", "/process/session/%2e/exec", 404),
        ("GET", "//version", 404),
        ("GET", "/version%00", 404),
        ("GET", "", 404),
        ("GET", "version", 404),
        ("DELETE", "/version", 405),
        ("HEAD", "/files/download", 405),
    ],
)
def test_everything_else_is_refused(method: str, path: str, status: int) -> None:
    assert toolbox_route_status(method, path) == status
