"""What an audit record says of a write, read off its URL (tidepool_api.audit.describe)."""

from __future__ import annotations

import pytest

from tidepool_api.audit import describe


@pytest.mark.parametrize(
    ("method", "path", "params", "expected"),
    [
        ("POST", "/api/sandbox", {}, ("create", "sandbox", None)),
        ("DELETE", "/api/sandbox/sb-1", {"sandbox_id_or_name": "sb-1"}, ("delete", "sandbox", "sb-1")),
        ("POST", "/api/sandbox/sb-1/start", {"sandbox_id_or_name": "sb-1"}, ("start", "sandbox", "sb-1")),
        ("PUT", "/api/sandbox/sb-1/labels", {"sandbox_id_or_name": "sb-1"}, ("labels", "sandbox", "sb-1")),
        (
            "POST",
            "/api/sandbox/sb-1/autostop/15",
            {"sandbox_id_or_name": "sb-1", "kind": "autostop", "minutes": 15},
            ("autostop", "sandbox", "sb-1"),
        ),
        (
            "POST",
            "/api/sandbox/sb-1/signing-key/rotate",
            {"sandbox_id": "sb-1"},
            ("signing_key_rotate", "sandbox", "sb-1"),
        ),
        ("POST", "/api/snapshots", {}, ("create", "snapshot", None)),
        ("PATCH", "/api/docker-registry/r1", {"registry_id": "r1"}, ("update", "docker_registry", "r1")),
        ("DELETE", "/api/api-keys/ci", {"name": "ci"}, ("delete", "api_key", "ci")),
        ("POST", "/api/volumes", {}, ("create", "volume", None)),
        (
            "PATCH",
            "/api/organizations/o1/quota",
            {"organization_id": "o1"},
            ("update_quota", "organization", "o1"),
        ),
        ("POST", "/api/webhooks/endpoints", {}, ("create", "webhook_endpoint", None)),
        ("PATCH", "/api/webhooks/endpoints/w1", {"endpoint_id": "w1"}, ("update", "webhook_endpoint", "w1")),
        (
            "POST",
            "/api/webhooks/endpoints/w1/rotate-secret",
            {"endpoint_id": "w1"},
            ("rotate_secret", "webhook_endpoint", "w1"),
        ),
        ("DELETE", "/api/webhooks/endpoints/w1", {"endpoint_id": "w1"}, ("delete", "webhook_endpoint", "w1")),
    ],
)
def test_describe(method: str, path: str, params: dict[str, object], expected: tuple[str, ...]) -> None:
    assert describe(method, path, params) == expected
