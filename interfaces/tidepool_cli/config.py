"""Where the CLI finds the API: `DAYTONA_API_URL` / `DAYTONA_API_KEY` win, then `tidepool login`'s file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_API_URL = "http://127.0.0.1:3000/api"


def config_path() -> Path:
    """`$XDG_CONFIG_HOME/tidepool/config.json` (default `~/.config/tidepool/config.json`)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tidepool" / "config.json"


@dataclass(frozen=True)
class Credentials:
    api_url: str
    api_key: str


def save(credentials: Credentials) -> Path:
    """Written 0600 from the start (never briefly world-readable): it holds an API key."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"api_url": credentials.api_url, "api_key": credentials.api_key}, handle)
    os.chmod(path, 0o600)
    return path


def load() -> Credentials:
    stored: dict[str, str] = {}
    path = config_path()
    if path.exists():
        stored = json.loads(path.read_text())
    return Credentials(
        api_url=os.environ.get("DAYTONA_API_URL") or stored.get("api_url") or DEFAULT_API_URL,
        api_key=os.environ.get("DAYTONA_API_KEY") or stored.get("api_key") or "",
    )
