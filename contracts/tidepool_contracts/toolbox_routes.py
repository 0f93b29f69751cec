"""The toolbox API's route table: what the proxy and the runner may forward to a sandbox's daemon.

Only these (method, path template) pairs exist on the daemon (issue #7: a relay that forwards any path is
a relay to whatever answers on the other end). `tests/unit/test_toolbox_routes.py` keeps this table equal
to the daemon's own router. Paths are matched percent-encoded, exactly as they will be forwarded, and
dot segments (`.`, `..`, also percent-encoded) or empty segments are refused outright.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from urllib.parse import unquote

# (method, template); `{name}` is one non-empty path segment. Order as in the daemon's router.
TOOLBOX_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/version"),
    ("GET", "/user-home-dir"),
    ("GET", "/work-dir"),
    ("GET", "/files"),
    ("DELETE", "/files"),
    ("GET", "/files/info"),
    ("POST", "/files/folder"),
    ("POST", "/files/bulk-upload"),
    ("POST", "/files/bulk-download"),
    ("GET", "/files/download"),
    ("POST", "/files/upload-v2"),
    ("POST", "/files/move"),
    ("POST", "/files/permissions"),
    ("GET", "/files/find"),
    ("GET", "/files/search"),
    ("POST", "/files/replace"),
    ("POST", "/env"),
    ("POST", "/init"),
    ("GET", "/system/metrics"),
    ("GET", "/port"),
    ("GET", "/port/{port}/in-use"),
    ("POST", "/process/execute"),
    ("GET", "/process/terminations"),
    ("GET", "/process/session/entrypoint"),
    ("GET", "/process/session/entrypoint/logs"),
    ("POST", "/process/session"),
    ("GET", "/process/session"),
    ("GET", "/process/session/{sessionId}"),
    ("DELETE", "/process/session/{sessionId}"),
    ("POST", "/process/session/{sessionId}/exec"),
    ("GET", "/process/session/{sessionId}/command/{commandId}"),
    ("GET", "/process/session/{sessionId}/command/{commandId}/logs"),
    ("POST", "/process/session/{sessionId}/command/{commandId}/input"),
    ("GET", "/process/pty/create-connect"),
    ("POST", "/process/pty"),
    ("GET", "/process/pty"),
    ("GET", "/process/pty/{sessionId}"),
    ("DELETE", "/process/pty/{sessionId}"),
    ("GET", "/process/pty/{sessionId}/connect"),
    ("POST", "/process/pty/{sessionId}/resize"),
    ("POST", "/process/code-run"),
    ("POST", "/process/interpreter/context"),
    ("GET", "/process/interpreter/context"),
    ("DELETE", "/process/interpreter/context/{id}"),
    ("GET", "/process/interpreter/execute"),
    ("POST", "/git/clone"),
    ("GET", "/git/status"),
    ("GET", "/git/branches"),
    ("POST", "/git/branches"),
    ("DELETE", "/git/branches"),
    ("POST", "/git/checkout"),
    ("POST", "/git/add"),
    ("POST", "/git/commit"),
    ("POST", "/git/push"),
    ("POST", "/git/pull"),
    ("GET", "/git/history"),
    ("POST", "/git/init"),
    ("POST", "/git/reset"),
    ("POST", "/git/restore"),
    ("POST", "/git/remotes"),
    ("GET", "/git/remotes"),
    ("POST", "/git/config"),
    ("GET", "/git/config"),
    ("POST", "/git/config/user"),
    ("POST", "/git/credentials"),
    ("POST", "/lsp/start"),
    ("POST", "/lsp/stop"),
    ("POST", "/lsp/did-open"),
    ("POST", "/lsp/did-close"),
    ("POST", "/lsp/completions"),
    ("GET", "/lsp/document-symbols"),
    ("GET", "/lsp/workspacesymbols"),
    ("GET", "/lsp/workspace-symbols"),
)

ROUTE_NOT_FOUND = 404
METHOD_NOT_ALLOWED = 405
_DOT_SEGMENTS = frozenset({".", ".."})


@dataclass(frozen=True)
class _Table:
    """The route table prepared for matching a path's segments: `exact` for templates without parameters
    (one dict lookup), `parameterized` (a `{name}` segment is None: any one non-empty segment) grouped by
    segment count. Every toolbox call is checked twice, in the proxy and in the runner, so this is kept
    to a dict lookup and a few string comparisons instead of a regular expression per route."""

    exact: dict[tuple[str, ...], frozenset[str]]
    parameterized: dict[int, tuple[tuple[tuple[str | None, ...], frozenset[str]], ...]]


_PARAMETER = re.compile(r"\{\w+\}")


@cache
def _table() -> _Table:
    methods: dict[tuple[str | None, ...], set[str]] = {}
    for method, template in TOOLBOX_ROUTES:
        pattern = tuple(
            None if _PARAMETER.fullmatch(segment) else segment for segment in template.split("/")[1:]
        )
        if any(segment is not None and ("{" in segment or "}" in segment) for segment in pattern):
            raise ValueError(f"a parameter must be a whole path segment: {template}")
        methods.setdefault(pattern, set()).add(method)
    exact: dict[tuple[str, ...], frozenset[str]] = {}
    grouped: dict[int, list[tuple[tuple[str | None, ...], frozenset[str]]]] = {}
    for pattern, allowed in methods.items():
        if None in pattern:
            grouped.setdefault(len(pattern), []).append((pattern, frozenset(allowed)))
        else:
            exact[tuple(segment for segment in pattern if segment is not None)] = frozenset(allowed)
    return _Table(exact, {length: tuple(patterns) for length, patterns in grouped.items()})


def _matches(pattern: tuple[str | None, ...], segments: list[str]) -> bool:
    for literal, segment in zip(pattern, segments, strict=True):
        if literal is not None and literal != segment:
            return False
    return True


def toolbox_route_status(method: str, raw_path: str) -> int | None:
    """None if `method raw_path` is a toolbox API route; else the status to answer: 404 for a path the
    API does not have (or a malformed one), 405 for a known path with another method. `raw_path` is the
    percent-encoded path after `/toolbox/{sandboxId}`, without the query."""
    if not raw_path.startswith("/"):
        return ROUTE_NOT_FOUND
    path = raw_path[:-1] if raw_path.endswith("/") and raw_path != "/" else raw_path
    segments = path.split("/")[1:]
    for segment in segments:
        decoded = unquote(segment)
        if not segment or decoded in _DOT_SEGMENTS or "\x00" in decoded:
            return ROUTE_NOT_FOUND
    table = _table()
    method = method.upper()
    allowed_elsewhere = False
    exact = table.exact.get(tuple(segments))
    if exact is not None:
        if method in exact:
            return None
        allowed_elsewhere = True
    for pattern, methods in table.parameterized.get(len(segments), ()):
        if _matches(pattern, segments):
            if method in methods:
                return None
            allowed_elsewhere = True
    return METHOD_NOT_ALLOWED if allowed_elsewhere else ROUTE_NOT_FOUND


# Routes whose requests last as long as their data or their user does, not as long as the work they ask
# for: file transfers (streamed bodies of any size) and log follows (`?follow=true`, open until the command
# ends). With WebSockets (PTY, interpreter, session log streams) they are exempt from toolbox admission
# (tidepool_runtime.admission), since a slot they held would be held for minutes or hours.
STREAMED_TRANSFER_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/files/download"),
        ("POST", "/files/bulk-download"),
        ("POST", "/files/bulk-upload"),
        ("POST", "/files/upload-v2"),
    }
)
_FOLLOWABLE_LOGS: tuple[tuple[str | None, ...], ...] = (
    ("process", "session", "entrypoint", "logs"),
    ("process", "session", None, "command", None, "logs"),
)


def is_long_lived(method: str, raw_path: str, follow: bool) -> bool:
    """True for a toolbox request that may stay open indefinitely by design: a streamed transfer
    (STREAMED_TRANSFER_ROUTES) or a log request with `follow` set. `raw_path` as in
    `toolbox_route_status` (a route it accepted); `follow`: the request's `follow` query parameter is
    `true` or `1`. WebSocket upgrades are recognized by the caller, from the headers."""
    path = raw_path[:-1] if raw_path.endswith("/") and raw_path != "/" else raw_path
    method = method.upper()
    if (method, path) in STREAMED_TRANSFER_ROUTES:
        return True
    if not follow or method != "GET":
        return False
    segments = path.split("/")[1:]
    return any(len(pattern) == len(segments) and _matches(pattern, segments) for pattern in _FOLLOWABLE_LOGS)


# Response header of the daemon for a request that carried `traceparent`: `start=<unix ns>;end=<unix ns>`,
# its handling time until the response head was written. The runner records it as the daemon's span and
# drops it (the daemon, dependency-free, exports nothing itself). Same name in tidepool_daemon.httpd.server.
DAEMON_SPAN_HEADER = "X-Tidepool-Daemon-Span"
