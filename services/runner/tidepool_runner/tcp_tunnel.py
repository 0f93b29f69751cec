"""`GET /sandboxes/{id}/tcp/{port}` (WebSocket): a raw TCP stream to a port on the sandbox's loopback, for
the SSH gateway's port forwarding (`ssh -L`). Binary frames carry the bytes both ways; either side closing
ends the tunnel.

Like previews it goes through the sandbox daemon's `CONNECT` (tidepool_daemon.port_forward) over a
verified daemon socket (daemon_connections.py): no host port is opened and only what the sandbox itself
reaches on loopback is reachable. Only holders of the runner token (the proxy, the SSH gateway) may call
it; the proxy never forwards a user's request here (it relays `/sandboxes/{id}/toolbox/…` only).
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web

from tidepool_runner.backend import ToolboxChannel, ToolboxUnreachableError
from tidepool_runtime.relay import error_response

_CHUNK = 64 * 1024


async def relay_tcp(
    request: web.Request, toolbox: ToolboxChannel, sandbox_id: str, port: int
) -> web.StreamResponse:
    try:
        reader, writer = await toolbox.open_tunnel(sandbox_id, port)
    except ToolboxUnreachableError:
        return error_response(request, 502, f"sandbox {sandbox_id} is not reachable")
    except OSError:
        return error_response(request, 502, f"nothing answers on port {port} in sandbox {sandbox_id}")
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)

    async def upstream() -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            writer.write(message.data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    async def downstream() -> None:
        while chunk := await reader.read(_CHUNK):
            await ws.send_bytes(chunk)

    tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        writer.close()
        await ws.close()
    return ws
