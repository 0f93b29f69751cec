"""Registry passwords leave the API (request/reply to the builder) sealed for the builder only."""

from __future__ import annotations

import pytest
from test_api_service import api  # noqa: F401 (the fixture, shared with the API service tests)

from tidepool_api.registries import credentials_for
from tidepool_api.secrets_box import SecretBox
from tidepool_runtime import sealing


async def test_the_reply_carries_the_password_sealed(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    context.secret_box = SecretBox("test-secret-key")
    body = {"name": "r", "url": "registry.example.com", "username": "u", "password": "the-password"}
    assert (await client.post("/api/docker-registry", json=body)).status_code in (200, 201)
    organization = (await client.post("/api/sandbox", json={})).json()["organizationId"]
    reply = await credentials_for(context, organization, "registry.example.com/team/app:1")
    assert reply.found and reply.username == "u"
    assert "the-password" not in reply.model_dump_json()
    assert context.registry_sealer.open(reply.password) == "the-password"
    # The builder's sealer, from the same configured key, opens it; any other key does not.
    key = sealing.load_seal_key("", context.settings.data_dir, sealing.REGISTRY_CREDENTIALS)
    assert sealing.Sealer(key, sealing.REGISTRY_CREDENTIALS).open(reply.password) == "the-password"
    with pytest.raises(ValueError):
        sealing.Sealer(key, sealing.SIGNING_KEYS).open(reply.password)
