"""The probes' logic (tidepool_runtime.health): liveness follows the watched loops only, readiness every
check, each bounded in time; the ASGI wrapper answers only its two paths."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tidepool_runtime import health as health_module
from tidepool_runtime.health import Health


async def test_liveness_fails_only_when_a_watched_loop_ended() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def crash() -> None:
        raise RuntimeError("boom")

    async def broken_dependency() -> None:
        raise ConnectionError("NATS connection is down")

    probes = Health("svc", {"nats": broken_dependency})
    alive = asyncio.create_task(forever(), name="loop")
    probes.watch(alive)
    assert probes.live() == (200, {"status": "ok", "checks": {}})  # a dependency down is not death
    dying = asyncio.create_task(crash(), name="heartbeat")
    probes.watch(dying)
    await asyncio.gather(dying, return_exceptions=True)
    assert probes.live() == (503, {"status": "fail", "checks": {"heartbeat": "ended"}})
    code, body = await probes.ready()
    assert code == 503 and body["checks"]["heartbeat"] == "ended"
    alive.cancel()


async def test_readiness_needs_every_check_and_bounds_each(monkeypatch: Any) -> None:
    monkeypatch.setattr(health_module, "CHECK_TIMEOUT_SECONDS", 0.05)

    async def ok() -> None:
        return None

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise ConnectionError("refused by 10.0.0.7:4222")

    assert await Health("svc", {"a": ok, "b": ok}).ready() == (
        200,
        {"status": "ok", "checks": {"a": "ok", "b": "ok"}},
    )
    code, body = await Health("svc", {"a": ok, "db": hangs, "nats": fails}).ready()
    assert code == 503 and body["status"] == "fail"
    assert body["checks"]["a"] == "ok"
    assert body["checks"]["db"].startswith("timed out")
    # Why goes to the log, never into the unauthenticated answer (it names internal addresses).
    assert body["checks"]["nats"] == "fail" and "10.0.0.7" not in str(body)


async def test_the_asgi_wrapper_answers_its_paths_and_passes_the_rest() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    async def down() -> None:
        raise ConnectionError("gone")

    wrapped = Health("api", {"database": down}).asgi(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t") as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] == "fail"
        assert (await client.get("/api/health")).status_code == 418
        assert (await client.post("/readyz")).status_code == 418
