"""Small informational endpoints: daemon version, user home dir, work dir."""

from __future__ import annotations

from . import DAEMON_VERSION
from .context import DaemonContext
from .httpd.http_io import Request, Response, json_response


class InfoService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    def version(self, request: Request) -> Response:
        return json_response(200, {"version": DAEMON_VERSION})

    def user_home_dir(self, request: Request) -> Response:
        return json_response(200, {"dir": self._context.home_dir})

    def work_dir(self, request: Request) -> Response:
        return json_response(200, {"dir": self._context.work_dir})
