"""Liveness and readiness of a service, for Kubernetes probes (issue #17).

- `GET /healthz` (liveness): 200 while the process's event loop answers and none of its watched loops
  (`Health.watch`) has died; else 503. It checks no dependency: a NATS outage must not restart every pod.
- `GET /readyz` (readiness): 200 only if every dependency check passes within `CHECK_TIMEOUT_SECONDS`; else
  503. Body (both): JSON `{"status": "ok"|"fail", "checks": {name: "ok" | error text}}`.

Where they are served: the API on its own HTTP port (`Health.asgi` in front of its app); every other service
on a small listener of its own, `TIDEPOOL_HEALTH_HOST`:`TIDEPOOL_HEALTH_PORT` (`serve_health`; port 0: none —
the one-machine stack runs every service on one host and so disables it). The proxy's and the runner's ports
are not used: every path there belongs to tenants (previews, the toolbox).

Checks (`bus_check`, `engine_check`, a database `SELECT 1`) are coroutines that raise on failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

log = structlog.get_logger("tidepool.health")

Check = Callable[[], Awaitable[object]]
CHECK_TIMEOUT_SECONDS = 2.0
LIVE_PATH, READY_PATH = "/healthz", "/readyz"


class Health:
    """A service's probes: named readiness checks, and the background loops whose death means not live."""

    def __init__(self, service: str, checks: dict[str, Check] | None = None) -> None:
        self.service = service
        self.checks: dict[str, Check] = dict(checks or {})
        self._watched: list[asyncio.Task[Any]] = []

    def add_check(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def watch(self, *tasks: asyncio.Task[Any]) -> None:
        """Loops that run for the whole life of the process: once one has ended, the process is not live."""
        self._watched.extend(tasks)

    def live(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of the liveness probe."""
        dead = {task.get_name(): "ended" for task in self._watched if task.done()}
        return (503, {"status": "fail", "checks": dead}) if dead else (200, {"status": "ok", "checks": {}})

    async def ready(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of the readiness probe: every check at once, each within the timeout."""
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(name, self.checks[name]) for name in names))
        checks = dict(zip(names, results, strict=True))
        live_status, live_body = self.live()
        checks.update(live_body["checks"])
        ok = live_status == 200 and all(result == "ok" for result in results)
        return (200 if ok else 503), {"status": "ok" if ok else "fail", "checks": checks}

    async def _run(self, name: str, check: Check) -> str:
        """`ok`, `timed out after <s> s` or `fail`: the probe is unauthenticated (on the API's public port),
        so why a check failed (addresses, host names) goes to the log, not into the answer."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(check(), timeout=CHECK_TIMEOUT_SECONDS)
        except TimeoutError:
            return f"timed out after {time.monotonic() - started:.1f} s"
        except Exception as error:
            log.warning("health.check_failed", check=name, error=f"{type(error).__name__}: {error}"[:300])
            return "fail"
        return "ok"

    async def answer(self, path: str) -> tuple[int, dict[str, Any]] | None:
        """The probe at `path`, or None for any other path."""
        if path == LIVE_PATH:
            return self.live()
        if path == READY_PATH:
            return await self.ready()
        return None

    def asgi(self, app: Any) -> Any:
        """`app` (ASGI) with `/healthz` and `/readyz` answered in front of it, unauthenticated."""

        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
                result = await self.answer(scope["path"])
                if result is not None:
                    status, body = result
                    payload = orjson.dumps(body)
                    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    await send({"type": "http.response.body", "body": payload})
                    return
            await app(scope, receive, send)

        return wrapped

    def aiohttp_app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            result = await self.answer(request.path)
            assert result is not None
            status, body = result
            return web.json_response(body, status=status, dumps=lambda value: orjson.dumps(value).decode())

        app = web.Application()
        app.router.add_get(LIVE_PATH, handle)
        app.router.add_get(READY_PATH, handle)
        return app


async def serve_health(health: Health, host: str, port: int) -> web.AppRunner | None:
    """Serve `health` on host:port (port 0: nothing, None returned); `await runner.cleanup()` stops it."""
    if not port:
        return None
    runner = web.AppRunner(health.aiohttp_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("health.listening", service=health.service, host=host, port=port)
    return runner


def bus_check(bus_of: Callable[[], Any]) -> Check:
    """Ready if the NATS connection of `bus_of()` (a `Bus`, or None while starting) is up and JetStream
    answers (`$JS.API.INFO`, which every service's login may send)."""

    async def check() -> None:
        bus = bus_of()
        if bus is None:
            raise RuntimeError("not connected yet")
        state = bus.broker.config.connection_state
        connection = state.connection if state else None
        if connection is None or not connection.is_connected:
            raise ConnectionError("NATS connection is down")
        await bus.jetstream.account_info()

    return check


def engine_check(docker_of: Callable[[], Any]) -> Check:
    """Ready if the container engine of `docker_of()` (an `aiodocker.Docker`) answers on its socket."""

    async def check() -> None:
        docker = docker_of()
        if docker is None:
            raise RuntimeError("not connected yet")
        await docker.version()

    return check
