"""Signed file URLs at the proxy: keys from KV, HMAC over the decoded path, expiry, scope, rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from urllib.parse import urlencode

import aiohttp
import pytest

from tidepool_contracts import channels
from tidepool_contracts.models import SigningKeyRecord
from tidepool_runtime import sealing
from tidepool_runtime.broker import Bus, kv_put
from tidepool_runtime.sealing import Sealer

from .conftest import SIGNING_SEAL_KEY, FakeRunner
from .test_proxy import ORG, add_api_key, add_route, error_body


def sign(key: str, method: str, path: str, expires: int) -> str:
    """Exactly the SDK's `compute_file_url_signature` (daytona/_utils/file_url_signing.py)."""
    digest = hmac.new(key.encode(), f"v1:files:{method}:{path}:{expires}".encode(), hashlib.sha256).digest()
    return "v1_" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signed_url(
    proxy_url: str, sandbox_id: str, operation: str, method: str, path: str, key: str, expires: int
) -> str:
    query = urlencode({"path": path, "expires": str(expires), "signature": sign(key, method, path, expires)})
    return f"{proxy_url}/toolbox/{sandbox_id}{operation}?{query}"


async def set_key(bus: Bus, sandbox_id: str, key: str, *, seal_key: str = SIGNING_SEAL_KEY) -> None:
    """Mirror `key` as the API does: sealed with the key the proxy holds (`seal_key`: another one)."""
    sealed = Sealer(seal_key, sealing.SIGNING_KEYS).seal(key)
    record = SigningKeyRecord(sandbox_id=sandbox_id, organization_id=ORG, key=sealed)
    await kv_put(await bus.kv(channels.SIGNING_KEYS), sandbox_id, record)


@pytest.fixture
async def signed_sandbox(bus: Bus, fake_runner: tuple[FakeRunner, str]) -> tuple[str, str]:
    sandbox_id = await add_route(bus, fake_runner[1])
    key = f"key-{uuid.uuid4().hex}"
    await set_key(bus, sandbox_id, key)
    return sandbox_id, key


async def test_valid_download_and_upload_urls_are_forwarded(
    http: aiohttp.ClientSession, proxy_url: str, signed_sandbox: tuple[str, str]
) -> None:
    sandbox_id, key = signed_sandbox
    path = "dir with space/ü+plus&amp.txt"
    url = signed_url(proxy_url, sandbox_id, "/files/download", "GET", path, key, int(time.time()) + 60)
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        echoed = await response.json()
    # The fake runner only answers 200 to the runner token, so the proxy authenticated this hop itself.
    assert echoed["method"] == "GET" and echoed["raw_path"].endswith("/files/download")
    assert "signature=" in echoed["raw_query"]

    never = signed_url(proxy_url, sandbox_id, "/files/upload-v2", "POST", "/tmp/x.bin", key, 0)
    async with http.post(never, data=b"raw body") as response:
        assert response.status == 200
        assert (await response.json())["body"] == "raw body"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda url: url.replace("signature=v1_", "signature=v1_x"), "invalid signed URL signature"),
        (lambda url: url.replace("path=a.txt", "path=b.txt"), "invalid signed URL signature"),
        (lambda url: url.replace("signature=v1_", "signature=v2_"), "invalid signed URL signature"),
        (lambda url: url + "&path=other.txt", "exactly one 'path'"),
        (lambda url: url.replace("expires=", "expires=x"), "'expires' must be unix seconds"),
    ],
)
async def test_tampered_urls_are_401(
    http: aiohttp.ClientSession,
    proxy_url: str,
    signed_sandbox: tuple[str, str],
    mutate,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    sandbox_id, key = signed_sandbox
    url = signed_url(proxy_url, sandbox_id, "/files/download", "GET", "a.txt", key, int(time.time()) + 60)
    async with http.get(mutate(url)) as response:
        assert response.status == 401
        assert message in str((await error_body(response))["message"])


async def test_expired_url_is_401(
    http: aiohttp.ClientSession, proxy_url: str, signed_sandbox: tuple[str, str]
) -> None:
    sandbox_id, key = signed_sandbox
    url = signed_url(proxy_url, sandbox_id, "/files/download", "GET", "a.txt", key, int(time.time()) - 1)
    async with http.get(url) as response:
        assert response.status == 401
        assert "expired" in str((await error_body(response))["message"])


async def test_signature_is_bound_to_method_operation_and_sandbox(
    http: aiohttp.ClientSession,
    proxy_url: str,
    bus: Bus,
    signed_sandbox: tuple[str, str],
    fake_runner: tuple[FakeRunner, str],
) -> None:
    sandbox_id, key = signed_sandbox
    expires = int(time.time()) + 60
    # A download signature used for an upload (and vice versa) fails.
    upload_with_get_signature = signed_url(
        proxy_url, sandbox_id, "/files/upload-v2", "GET", "a", key, expires
    )
    async with http.post(upload_with_get_signature, data=b"x") as response:
        assert response.status == 401
    # Valid signature shapes on other endpoints grant nothing.
    for operation, method in (("/process/execute", "POST"), ("/files", "GET"), ("/files/download", "DELETE")):
        url = signed_url(proxy_url, sandbox_id, operation, method, "a", key, expires)
        async with http.request(method, url) as response:
            assert response.status == 401, operation
    # Another sandbox with the same URL shape but its own key.
    other = await add_route(bus, fake_runner[1])
    await set_key(bus, other, "another-key")
    url = signed_url(proxy_url, other, "/files/download", "GET", "a", key, expires)
    async with http.get(url) as response:
        assert response.status == 401
    # A sandbox without any key.
    keyless = await add_route(bus, fake_runner[1])
    async with http.get(
        signed_url(proxy_url, keyless, "/files/download", "GET", "a", key, expires)
    ) as response:
        assert response.status == 401


async def test_rotation_invalidates_old_urls_and_new_key_works_at_once(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, signed_sandbox: tuple[str, str]
) -> None:
    sandbox_id, old_key = signed_sandbox
    expires = int(time.time()) + 60
    old_url = signed_url(proxy_url, sandbox_id, "/files/download", "GET", "a", old_key, expires)
    async with http.get(old_url) as response:
        assert response.status == 200  # the proxy has now cached the old key
    await set_key(bus, sandbox_id, "rotated-key")
    # Made with the new key right away: the cached (old) key fails, the direct read succeeds.
    new_url = signed_url(proxy_url, sandbox_id, "/files/download", "GET", "a", "rotated-key", expires)
    async with http.get(new_url) as response:
        assert response.status == 200
    async with http.get(old_url) as response:
        assert response.status == 401


async def test_bearer_requests_ignore_signature_params(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, signed_sandbox: tuple[str, str]
) -> None:
    sandbox_id, _ = signed_sandbox
    api_key = await add_api_key(bus, ORG)
    url = f"{proxy_url}/toolbox/{sandbox_id}/files/download?path=a&expires=1&signature=v1_bad"
    async with http.get(url, headers={"Authorization": f"Bearer {api_key}"}) as response:
        assert response.status == 200


@pytest.mark.parametrize("mirror", ["plain", "other-seal-key"])
async def test_a_key_not_sealed_for_this_proxy_verifies_nothing(
    http: aiohttp.ClientSession, proxy_url: str, bus: Bus, fake_runner: tuple[FakeRunner, str], mirror: str
) -> None:
    """Whoever can write the bucket without the API's sealing key cannot plant a key of their own."""
    sandbox_id = await add_route(bus, fake_runner[1])
    key = f"planted-{uuid.uuid4().hex}"
    if mirror == "plain":
        record = SigningKeyRecord(sandbox_id=sandbox_id, organization_id=ORG, key=key)
        await kv_put(await bus.kv(channels.SIGNING_KEYS), sandbox_id, record)
    else:
        await set_key(bus, sandbox_id, key, seal_key="not-the-proxys-key")
    url = signed_url(proxy_url, sandbox_id, "/files/download", "GET", "a.txt", key, int(time.time()) + 60)
    async with http.get(url) as response:
        assert response.status == 401
        assert "invalid signed URL signature" in str((await error_body(response))["message"])
