"""The official SDK client built from the CLI's credentials."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tidepool_cli.config import load
from tidepool_cli.output import NotLoggedIn

if TYPE_CHECKING:
    from daytona import Daytona


def connect() -> Daytona:
    """The SDK is imported here, not at start-up: `tidepool up|down` should not pay for it."""
    from daytona import Daytona, DaytonaConfig

    credentials = load()
    if not credentials.api_key:
        raise NotLoggedIn("no API key: run `tidepool login` or set DAYTONA_API_KEY")
    return Daytona(DaytonaConfig(api_url=credentials.api_url, api_key=credentials.api_key))


def rest(method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None) -> Any:
    """The API's routes the SDK has no call for (API keys, organizations), with httpx.

    A failure is raised as the SDK's own errors (status code kept), so `api_errors` maps it alike."""
    import httpx
    from daytona import DaytonaConnectionError, DaytonaError

    credentials = load()
    if not credentials.api_key:
        raise NotLoggedIn("no API key: run `tidepool login` or set DAYTONA_API_KEY")
    try:
        response = httpx.request(
            method,
            f"{credentials.api_url}{path}",
            json=json,
            params=params,
            headers={"Authorization": f"Bearer {credentials.api_key}"},
            timeout=60,
        )
    except httpx.TransportError as error:
        raise DaytonaConnectionError(f"cannot reach {credentials.api_url}: {error}") from None
    if response.is_error:
        try:
            message = response.json().get("message")
        except ValueError:
            message = None
        reason = f"{response.status_code} {response.reason_phrase}"
        raise DaytonaError(str(message or reason), status_code=response.status_code)
    return response.json() if response.content else None
