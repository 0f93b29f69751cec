"""Which requests are previews: `{port}-{id}.{domain}` in `Host` or a custom proxy's `X-Forwarded-Host`."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from tidepool_proxy.previews import _origin_sandbox, preview_target

SANDBOX = "0b6c7f3e-5d0a-4c55-9d43-2a1f0c3e9b11"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (f"3000-{SANDBOX}.localhost:4000", (3000, SANDBOX)),
        (f"8080-{SANDBOX.upper()}.preview.example.com", (8080, SANDBOX)),
        ("3000-abcdefghijklmnop2345.localhost", (3000, "abcdefghijklmnop2345")),
        ("localhost:4000", None),
        ("127.0.0.1:4000", None),
        (f"3000-{SANDBOX}", None),  # a bare label is no preview domain
        (f"x3000-{SANDBOX}.localhost", None),
        ("[::1]:4000", None),
    ],
)
def test_host_names_a_preview(host: str, expected: tuple[int, str] | None) -> None:
    target = preview_target(make_mocked_request("GET", "/", headers={"Host": host}))
    assert (None if target is None else (target.port, target.label)) == expected


def test_forwarded_host_of_a_custom_proxy_wins() -> None:
    request = make_mocked_request(
        "GET",
        "/",
        headers={"Host": "localhost:4000", "X-Forwarded-Host": f"5173-{SANDBOX}.dev.example.org"},
    )
    target = preview_target(request)
    assert target is not None and (target.port, target.label) == (5173, SANDBOX)


def test_origin_of_the_same_sandbox() -> None:
    assert _origin_sandbox(f"http://3000-{SANDBOX}.localhost:4000") == SANDBOX
    assert _origin_sandbox("https://evil.example") is None
    assert _origin_sandbox("null") is None
