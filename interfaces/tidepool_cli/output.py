"""What the CLI prints: rich tables for people, JSON for scripts, errors on stderr with an exit code that
says what went wrong (`ExitCode`, listed in `tidepool --help` and the README)."""

from __future__ import annotations

import contextlib
import enum
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

stdout = Console()
stderr = Console(stderr=True)


class Format(enum.StrEnum):
    table = "table"
    json = "json"


def plain(value: Any) -> Any:
    """A JSON-ready form of an SDK value (enums by value, datetimes as ISO text)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def record(item: Any, fields: Sequence[str]) -> dict[str, Any]:
    return {field: plain(getattr(item, field, None)) for field in fields}


def emit(rows: list[dict[str, Any]], columns: Sequence[str], fmt: Format, single: bool = False) -> None:
    if fmt is Format.json:
        sys.stdout.write(json.dumps(rows[0] if single else rows, indent=2, default=str) + "\n")
        return
    table = Table()
    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    for index, column in enumerate(columns):
        # An id is never cut or folded, however narrow the terminal: it is what people copy.
        whole = column in ("id", "name")
        width = max((len(line[index]) for line in cells), default=0) if whole else None
        table.add_column(column, no_wrap=whole, min_width=width)
    for line in cells:
        table.add_row(*line)
    stdout.print(table)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)


class ExitCode(enum.IntEnum):
    """What a failed command's exit status means (`exec` and `ssh` exit with the remote command's own)."""

    OK = 0
    ERROR = 1  # any other failure (a 5xx from the API, an unexpected answer)
    USAGE = 2  # a bad option or argument (click's own code)
    NOT_FOUND = 3  # 404: no such sandbox, snapshot, volume, key or organization (or another tenant's)
    UNAUTHENTICATED = 4  # no API key configured, or the key is invalid, expired or revoked (401)
    FORBIDDEN = 5  # the key lacks the permission, or the call is admin-only (403)
    CONFLICT = 6  # 400/409/422: the request was refused as invalid or clashing (a name already taken)
    LIMITED = 7  # 429: a quota or rate limit
    TIMEOUT = 8  # a wait ran out (the sandbox did not start in --timeout)
    UNAVAILABLE = 9  # the API cannot be reached, or answered 502/503/504


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 error; 2 usage; 3 not found; 4 not authenticated; 5 forbidden; "
    "6 invalid or conflicting request; 7 quota or rate limit; 8 timed out; 9 API unavailable. "
    "`exec` and `ssh` exit with the remote command's status."
)

BY_STATUS = {
    400: ExitCode.CONFLICT,
    401: ExitCode.UNAUTHENTICATED,
    403: ExitCode.FORBIDDEN,
    404: ExitCode.NOT_FOUND,
    408: ExitCode.TIMEOUT,
    409: ExitCode.CONFLICT,
    413: ExitCode.LIMITED,
    422: ExitCode.CONFLICT,
    429: ExitCode.LIMITED,
    502: ExitCode.UNAVAILABLE,
    503: ExitCode.UNAVAILABLE,
    504: ExitCode.UNAVAILABLE,
}


class NotLoggedIn(ValueError):
    """No API key in the environment nor in `tidepool login`'s file."""


def exit_code(error: BaseException) -> ExitCode:
    from daytona import (
        DaytonaAuthenticationError,
        DaytonaConnectionError,
        DaytonaNotFoundError,
        DaytonaTimeoutError,
    )

    if isinstance(error, NotLoggedIn):
        return ExitCode.UNAUTHENTICATED
    status = getattr(error, "status_code", None)
    if status in BY_STATUS:
        return BY_STATUS[status]
    if isinstance(error, DaytonaNotFoundError):
        return ExitCode.NOT_FOUND
    if isinstance(error, DaytonaAuthenticationError):
        return ExitCode.UNAUTHENTICATED
    if isinstance(error, DaytonaTimeoutError):
        return ExitCode.TIMEOUT
    if isinstance(error, DaytonaConnectionError) or unreachable(error):
        return ExitCode.UNAVAILABLE
    return ExitCode.ERROR


def unreachable(error: BaseException) -> bool:
    """The SDK wraps a refused or failed connection in a plain DaytonaError: look down its causes."""
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    cause: BaseException | None = error
    for _ in range(8):
        if cause is None:
            return False
        if isinstance(cause, ConnectionError | MaxRetryError | NewConnectionError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def fail(message: str, code: ExitCode) -> typer.Exit:
    """Print `error: message` on stderr; raise the returned Exit."""
    # soft_wrap: one line per message, never folded at the terminal's width (scripts grep it).
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(int(code))


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """An API or configuration failure: its message on stderr and its `ExitCode` (usage errors are 2)."""
    from daytona import DaytonaError

    try:
        yield
    except (DaytonaError, ValueError) as error:
        raise fail(str(error) or type(error).__name__, exit_code(error)) from None


def waiting(message: str) -> Any:
    """A spinner on stderr while the SDK waits (stdout stays clean for `--format json`)."""
    return stderr.status(message)


def pairs(values: list[str], option: str) -> dict[str, str]:
    """`KEY=VALUE` options (`--env`, `--label`) into a dict; a malformed one is a usage error."""
    result: dict[str, str] = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint=option)
        result[key] = item
    return result
