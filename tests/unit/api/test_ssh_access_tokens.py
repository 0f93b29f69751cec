"""SSH access tokens as the API makes them (tidepool_api.ssh_access): 32 alphanumerics (no `_`/`-`, like
Daytona's), stored and published only as SHA-256, and valid strictly before `expires_at` (clock passed in)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tidepool_api.db import SshAccess
from tidepool_api.ssh_access import is_valid, new_token, token_hash

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_tokens_are_32_alphanumerics_and_distinct() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    assert all(len(token) == 32 and token.isalnum() and token.isascii() for token in tokens)


def test_only_the_hash_is_kept() -> None:
    token = new_token()
    assert token_hash(token) != token and len(token_hash(token)) == 64


def test_validity_ends_at_expiry() -> None:
    access = SshAccess(id="a", sandbox_id="sb", token_hash="h", expires_at=NOW + timedelta(minutes=1))
    assert is_valid(access, NOW)
    assert is_valid(access, NOW + timedelta(seconds=59))
    assert not is_valid(access, NOW + timedelta(minutes=1))
    assert not is_valid(None, NOW)
    naive = SshAccess(id="b", sandbox_id="sb", token_hash="h2", expires_at=datetime(2026, 1, 1, 0, 1))
    assert is_valid(naive, NOW) and not is_valid(naive, NOW + timedelta(minutes=2))
