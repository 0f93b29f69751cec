"""The official SDK client built from the CLI's credentials."""

from __future__ import annotations

from daytona import Daytona, DaytonaConfig

from tidepool_cli.config import load


def connect() -> Daytona:
    credentials = load()
    if not credentials.api_key:
        raise ValueError("no API key: run `tidepool login` or set DAYTONA_API_KEY")
    return Daytona(DaytonaConfig(api_url=credentials.api_url, api_key=credentials.api_key))
