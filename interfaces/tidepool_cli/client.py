"""The official SDK client built from the CLI's credentials."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidepool_cli.config import load

if TYPE_CHECKING:
    from daytona import Daytona


def connect() -> Daytona:
    """The SDK is imported here, not at start-up: `tidepool up|down` should not pay for it."""
    from daytona import Daytona, DaytonaConfig

    credentials = load()
    if not credentials.api_key:
        raise ValueError("no API key: run `tidepool login` or set DAYTONA_API_KEY")
    return Daytona(DaytonaConfig(api_url=credentials.api_url, api_key=credentials.api_key))
