"""A minimal method + path router with `{name}` path parameters."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import METHOD_NOT_ALLOWED, NOT_FOUND, DaemonError
from .http_io import Request, Response

RouteHandler = Callable[[Request], Response]

_PARAM_PATTERN = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class _Route:
    pattern: re.Pattern[str]
    handlers: dict[str, RouteHandler]


class Router:
    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}

    def add(self, method: str, template: str, handler: RouteHandler) -> None:
        route = self._routes.get(template)
        if route is None:
            route = _Route(re.compile(f"^{_template_to_regex(template)}$"), {})
            self._routes[template] = route
        route.handlers[method.upper()] = handler

    def extend(self, other: Router) -> None:
        """Take every route of `other`, keeping its order (the first match wins)."""
        for template, route in other._routes.items():
            for method, handler in route.handlers.items():
                self.add(method, template, handler)

    def routes(self) -> list[tuple[str, str]]:
        """Every (method, template) pair, in matching order: the toolbox API's route table."""
        return [(method, template) for template, route in self._routes.items() for method in route.handlers]

    def resolve(self, method: str, raw_path: str) -> tuple[RouteHandler, dict[str, str]]:
        """Find the handler for `raw_path` (still percent-encoded); 404/405 as DaemonError otherwise."""
        path = raw_path.rstrip("/") or "/"
        allowed: set[str] = set()
        for route in self._routes.values():
            match = route.pattern.match(path)
            if match is None:
                continue
            handler = route.handlers.get(method.upper())
            if handler is not None:
                return handler, {name: unquote(value) for name, value in match.groupdict().items()}
            allowed.update(route.handlers)
        if allowed:
            raise DaemonError(
                405,
                f"method {method} not allowed for {path}; allowed: {', '.join(sorted(allowed))}",
                METHOD_NOT_ALLOWED,
            )
        raise DaemonError(404, f"route not found: {method} {path}", NOT_FOUND)


def _template_to_regex(template: str) -> str:
    """Escape the literal parts of a route template and turn `{name}` into a named segment group."""
    pieces = _PARAM_PATTERN.split(template)
    # split() with one capture group alternates literal text (even indexes) and parameter names (odd).
    return "".join(
        re.escape(piece) if index % 2 == 0 else f"(?P<{piece}>[^/]+)" for index, piece in enumerate(pieces)
    )
