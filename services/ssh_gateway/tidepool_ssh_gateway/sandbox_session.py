"""One SSH channel in a sandbox, carried by the sandbox's toolbox API through its runner (as the proxy does):

- a shell (`ssh host`, with or without `-t`): a PTY session of the daemon, WebSocket
  `/process/pty/create-connect` with the exit-control subprotocol; window changes become
  `POST /process/pty/{id}/resize`; the shell's exit code is the channel's exit status;
- a command (`ssh host 'cmd'`): `POST /process/execute` without a timeout (so `nohup … &` keeps running
  after the command returns); its combined output and exit code come back when it ends. The command's
  stdin is /dev/null (the daemon's execute has no input).

When the client goes away before the shell ends, the shell is told to leave (`Ctrl-C`, then `exit`): like
sshd's hang-up, what runs under `nohup` (or `setsid`) keeps running; if the shell is still there after a
grace period (a full-screen program in front), the PTY session is deleted, which ends its whole tree.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid

import aiohttp
import asyncssh
import structlog

from tidepool_ssh_gateway.grants import Target

log = structlog.get_logger("tidepool.ssh_gateway.session")

EXIT_CONTROL = "X-Daytona-Pty-Exit-Control"
HANGUP_INPUT = b"\x03exit\n"
HANGUP_GRACE_SECONDS = 10.0
DEFAULT_COLS, DEFAULT_ROWS = 80, 24
_CHUNK = 64 * 1024


class SandboxSessions:
    def __init__(self, runners: aiohttp.ClientSession, runner_token: str) -> None:
        self._runners = runners
        self._headers = {"Authorization": f"Bearer {runner_token}"}

    def _url(self, target: Target, path: str) -> str:
        return f"{target.runner_url}/sandboxes/{target.sandbox_id}/toolbox{path}"

    async def run(self, target: Target, process: asyncssh.SSHServerProcess[bytes]) -> None:
        try:
            if process.command:
                await self._execute(target, process, process.command)
            else:
                await self._shell(target, process)
        except Exception as error:  # the runner or the sandbox went away
            log.warning("ssh_gateway.session_failed", sandbox_id=target.sandbox_id, error=str(error))
            with contextlib.suppress(Exception):
                process.stderr.write(f"tidepool: {error}\r\n".encode())
            process.exit(255)

    async def _execute(self, target: Target, process: asyncssh.SSHServerProcess[bytes], command: str) -> None:
        async with self._runners.post(
            self._url(target, "/process/execute"), json={"command": command}, headers=self._headers
        ) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise RuntimeError(f"execute answered {response.status}: {body}")
        output = str(body.get("result", ""))
        if output:
            process.stdout.write(output.encode())
        process.exit(int(body.get("exitCode", 0) or 0))

    async def _shell(self, target: Target, process: asyncssh.SSHServerProcess[bytes]) -> None:
        cols, rows, *_ = process.term_size if process.term_type else (DEFAULT_COLS, DEFAULT_ROWS)
        cols, rows = cols or DEFAULT_COLS, rows or DEFAULT_ROWS
        session_id = f"ssh-{uuid.uuid4().hex[:12]}"
        envs = {"TERM": process.term_type or "xterm-256color"}
        encoded = base64.urlsafe_b64encode(json.dumps(envs).encode()).decode().rstrip("=")
        url = self._url(target, f"/process/pty/create-connect?id={session_id}&cols={cols}&rows={rows}")
        async with self._runners.ws_connect(
            url, protocols=(EXIT_CONTROL, f"X-Daytona-Pty-Envs~{encoded}"), headers=self._headers
        ) as ws:
            exit_code: list[int] = []
            output = asyncio.create_task(self._pump_output(ws, process, exit_code))
            input_ = asyncio.create_task(self._pump_input(target, session_id, ws, process))
            done, _ = await asyncio.wait({output, input_}, return_when=asyncio.FIRST_COMPLETED)
            if output in done:  # the shell ended
                input_.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await input_
                process.exit(exit_code[0] if exit_code else 0)
                return
            # The client went away: hang up the shell, leave nohup'd work running.
            with contextlib.suppress(Exception):
                await ws.send_bytes(HANGUP_INPUT)
            try:
                await asyncio.wait_for(output, HANGUP_GRACE_SECONDS)
            except (TimeoutError, Exception):
                output.cancel()
                with contextlib.suppress(Exception):
                    async with self._runners.delete(
                        self._url(target, f"/process/pty/{session_id}"), headers=self._headers
                    ):
                        pass
            process.exit(exit_code[0] if exit_code else 0)

    @staticmethod
    async def _pump_output(
        ws: aiohttp.ClientWebSocketResponse, process: asyncssh.SSHServerProcess[bytes], exit_code: list[int]
    ) -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                process.stdout.write(message.data)
            elif message.type == aiohttp.WSMsgType.TEXT:
                with contextlib.suppress(ValueError, AttributeError):
                    control = json.loads(message.data)
                    if control.get("type") == "control" and control.get("status") == "exited":
                        exit_code.append(int(control.get("exitCode", 0)))
            else:
                break
        if not exit_code and ws.close_code is not None:
            with contextlib.suppress(ValueError, TypeError):
                exit_code.append(int(json.loads(ws.extra or "{}").get("exitCode", 0)))

    async def _pump_input(
        self,
        target: Target,
        session_id: str,
        ws: aiohttp.ClientWebSocketResponse,
        process: asyncssh.SSHServerProcess[bytes],
    ) -> None:
        while True:
            try:
                data = await process.stdin.read(_CHUNK)
            except asyncssh.TerminalSizeChanged as change:
                await self._resize(target, session_id, change.width, change.height)
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue
            except Exception:  # the connection is gone
                return
            if not data:
                # EOF (e.g. `ssh -tt host < script`): a terminal cannot be half-closed, so, as with sshd,
                # the shell goes on reading what it has; only the channel's close means the client left.
                with contextlib.suppress(Exception):
                    await process.channel.wait_closed()
                return
            await ws.send_bytes(data)

    async def forward(
        self, target: Target, port: int, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
    ) -> None:
        """`ssh -L …:localhost:port`: one forwarded connection, carried by the runner's TCP tunnel
        (`/sandboxes/{id}/tcp/{port}`, the daemon's CONNECT to the sandbox's loopback)."""
        url = f"{target.runner_url}/sandboxes/{target.sandbox_id}/tcp/{port}"
        try:
            async with self._runners.ws_connect(url, headers=self._headers, max_msg_size=0) as ws:

                async def upstream() -> None:
                    while data := await reader.read(_CHUNK):
                        await ws.send_bytes(data)
                    await ws.close()

                async def downstream() -> None:
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.BINARY:
                            break
                        writer.write(message.data)
                        await writer.drain()

                tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        except Exception as error:
            log.info("ssh_gateway.forward_failed", sandbox_id=target.sandbox_id, port=port, error=str(error))
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _resize(self, target: Target, session_id: str, cols: int, rows: int) -> None:
        if cols <= 0 or rows <= 0:
            return
        async with self._runners.post(
            self._url(target, f"/process/pty/{session_id}/resize"),
            json={"cols": cols, "rows": rows},
            headers=self._headers,
        ):
            pass
