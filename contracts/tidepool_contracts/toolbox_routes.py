"""The toolbox API's route table: what the proxy and the runner may forward to a sandbox's daemon.

Only these (method, path template) pairs exist on the daemon (issue #7: a relay that forwards any path is
a relay to whatever answers on the other end). `tests/unit/test_toolbox_routes.py` keeps this table equal
to the daemon's own router. Paths are matched percent-encoded, exactly as they will be forwarded, and
dot segments (`.`, `..`, also percent-encoded) or empty segments are refused outright.
"""

from __future__ import annotations

import re
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


@cache
def _compiled() -> tuple[tuple[re.Pattern[str], frozenset[str]], ...]:
    methods: dict[str, set[str]] = {}
    for method, template in TOOLBOX_ROUTES:
        methods.setdefault(template, set()).add(method)
    return tuple(
        (re.compile(f"^{_template_regex(template)}$"), frozenset(allowed))
        for template, allowed in methods.items()
    )


def _template_regex(template: str) -> str:
    pieces = re.split(r"\{(\w+)\}", template)
    # Literal text at even indexes, parameter names at odd ones.
    return "".join(re.escape(piece) if index % 2 == 0 else "[^/]+" for index, piece in enumerate(pieces))


def toolbox_route_status(method: str, raw_path: str) -> int | None:
    """None if `method raw_path` is a toolbox API route; else the status to answer: 404 for a path the
    API does not have (or a malformed one), 405 for a known path with another method. `raw_path` is the
    percent-encoded path after `/toolbox/{sandboxId}`, without the query."""
    if not raw_path.startswith("/"):
        return ROUTE_NOT_FOUND
    path = raw_path[:-1] if raw_path.endswith("/") and raw_path != "/" else raw_path
    for segment in path.split("/")[1:]:
        decoded = unquote(segment)
        if not segment or decoded in _DOT_SEGMENTS or "\x00" in decoded:
            return ROUTE_NOT_FOUND
    allowed_elsewhere = False
    for pattern, methods in _compiled():
        if pattern.match(path):
            if method.upper() in methods:
                return None
            allowed_elsewhere = True
    return METHOD_NOT_ALLOWED if allowed_elsewhere else ROUTE_NOT_FOUND
