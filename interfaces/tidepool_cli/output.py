"""What the CLI prints: rich tables for people, JSON for scripts, errors on stderr with exit status 1."""

from __future__ import annotations

import contextlib
import enum
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import typer
from rich.console import Console
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


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """An API or configuration failure: its message on stderr and exit status 1 (usage errors are 2)."""
    from daytona import DaytonaError

    try:
        yield
    except (DaytonaError, ValueError) as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False, markup=True)
        raise typer.Exit(1) from None


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
