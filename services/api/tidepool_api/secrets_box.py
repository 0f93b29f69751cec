"""Encryption at rest for credentials the platform must give back later (registry passwords)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tidepool_runtime.sealing import Sealer
from tidepool_runtime.settings import ApiSettings


def load_secret_key(settings: ApiSettings) -> str:
    """The configured key, or one generated on first start and kept (0600) in the data directory."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir) / "secret-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


class SecretBox(Sealer):
    """Secrets at rest in the database (registry passwords), under the API's own key; the derivation is
    this box's own, so what it sealed stays readable across upgrades."""

    def __init__(self, secret_key: str) -> None:
        super().__init__(secret_key, "at-rest", derivation=b"tidepool-secret-box:")
