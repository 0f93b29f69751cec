"""The embedded nats-server (`make up`): a login per service, generated once, hashed in its configuration;
nothing connects without one; each service is given its own login and only its sealing keys."""

from __future__ import annotations

import json
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError
from nats.errors import NoServersError

from tidepool_contracts.access import SERVICE_ACCESS
from tidepool_stack.supervisor import SERVICES, Stack, StackConfig


async def started(data_dir: Path) -> tuple[Stack, str]:
    stack = Stack(StackConfig(data_dir=data_dir), sink=lambda _service, _line: None)
    return stack, await stack.start_nats()


async def test_a_login_per_service_generated_once(tmp_path: Path) -> None:
    assert set(SERVICES) == set(SERVICE_ACCESS)
    stack, url = await started(tmp_path)
    try:
        credentials, config = tmp_path / "nats-credentials.json", tmp_path / "nats.conf"
        assert credentials.stat().st_mode & 0o777 == 0o600 and config.stat().st_mode & 0o777 == 0o600
        passwords = json.loads(credentials.read_text())
        assert set(passwords) == set(SERVICES)
        assert not any(password in config.read_text() for password in passwords.values())
        for login in ({}, {"user": "api", "password": "guess"}):
            with pytest.raises((NoServersError, NatsError, OSError)):
                await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, **login)
        for service in SERVICES:
            env = stack.service_env(service)
            assert env["TIDEPOOL_NATS_USER"] == service
            nc = await nats.connect(
                url, user=service, password=env["TIDEPOOL_NATS_PASSWORD"], allow_reconnect=False
            )
            await nc.close()
            assert ("TIDEPOOL_SIGNING_SEAL_KEY" in env) == (service in ("api", "proxy")), service
            assert ("TIDEPOOL_REGISTRY_SEAL_KEY" in env) == (service in ("api", "builder")), service
        assert (
            stack.service_env("api")["TIDEPOOL_SIGNING_SEAL_KEY"]
            == stack.service_env("proxy")["TIDEPOOL_SIGNING_SEAL_KEY"]
        )
    finally:
        await stack.stop()
    again, _ = await started(tmp_path)
    try:
        assert again.nats_passwords == passwords, "a second start reuses the logins"
    finally:
        await again.stop()
