"""bcrypt at its lowest cost in these tests: the bootstrap's hashes are checked for what they match, not for
their cost, and each plan hashes every NATS user's password."""

from __future__ import annotations

import pytest

from tidepool_runtime import nats_auth


@pytest.fixture(autouse=True)
def cheap_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nats_auth, "BCRYPT_ROUNDS", 4)
