"""The MCP server (official `mcp` SDK, MCPServer): sandbox tools for agents, over stdio or streamable HTTP.

Each tool is one SDK call against the REST API, run in a worker thread so the server keeps answering; an
API error becomes a tool error (the SDK turns a raised exception into `isError`), never a crash."""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio
from daytona import DaytonaError
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from tidepool_cli.client import connect
from tidepool_cli.output import record

T = TypeVar("T")
SANDBOX_FIELDS = ("id", "name", "state", "snapshot", "cpu", "memory", "disk", "labels")


async def off_loop(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function` in a worker thread; an API error becomes a ToolError, whose message the agent sees (the MCP
    SDK keeps any other exception's text on the server and answers only "Error executing tool ...")."""
    try:
        return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs))
    except DaytonaError as error:
        raise ToolError(str(error) or type(error).__name__) from error


def build() -> MCPServer:
    server = MCPServer(
        "tidepool",
        instructions="Create Tidepool sandboxes, run commands and move files in them, then destroy them.",
    )

    def sandbox(sandbox_id: str) -> Any:
        return connect().get(sandbox_id)

    @server.tool()
    async def create_sandbox(
        snapshot: str | None = None,
        name: str | None = None,
        env_vars: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        auto_stop_interval: int | None = None,
    ) -> dict[str, Any]:
        """Create a sandbox (from a snapshot, or the default one) and wait until it has started."""
        from daytona import CreateSandboxFromSnapshotParams

        params = CreateSandboxFromSnapshotParams(
            snapshot=snapshot,
            name=name,
            env_vars=env_vars,
            labels=labels,
            auto_stop_interval=auto_stop_interval,
        )
        created = await off_loop(lambda: connect().create(params, timeout=180))
        return record(created, SANDBOX_FIELDS)

    @server.tool()
    async def destroy_sandbox(sandbox_id: str) -> str:
        """Delete a sandbox."""
        await off_loop(lambda: sandbox(sandbox_id).delete())
        return f"{sandbox_id} deleted"

    @server.tool()
    async def execute_command(
        sandbox_id: str, command: str, cwd: str | None = None, timeout: int | None = None
    ) -> dict[str, Any]:
        """Run a shell command in a sandbox; returns its exit code and combined output."""
        response = await off_loop(lambda: sandbox(sandbox_id).process.exec(command, cwd=cwd, timeout=timeout))
        return {"exit_code": response.exit_code, "output": response.result}

    @server.tool()
    async def upload_file(
        sandbox_id: str, path: str, content: str, encoding: Literal["utf-8", "base64"] = "utf-8"
    ) -> str:
        """Write a file in a sandbox (content as text, or base64 for binary data)."""
        data = base64.b64decode(content) if encoding == "base64" else content.encode()
        await off_loop(lambda: sandbox(sandbox_id).fs.upload_file(data, path))
        return f"{len(data)} bytes written to {path}"

    @server.tool()
    async def download_file(
        sandbox_id: str, path: str, encoding: Literal["utf-8", "base64"] = "utf-8"
    ) -> str:
        """Read a file from a sandbox (as text, or base64 for binary data)."""
        data: bytes = await off_loop(lambda: sandbox(sandbox_id).fs.download_file(path))
        return base64.b64encode(data).decode() if encoding == "base64" else data.decode(errors="replace")

    @server.tool()
    async def list_files(sandbox_id: str, path: str) -> list[dict[str, Any]]:
        """List a directory in a sandbox."""
        found = await off_loop(lambda: sandbox(sandbox_id).fs.list_files(path))
        return [record(item, ("name", "is_dir", "size", "mode", "mod_time")) for item in found]

    @server.tool()
    async def move_file(sandbox_id: str, source: str, destination: str) -> str:
        """Move or rename a file or directory in a sandbox."""
        await off_loop(lambda: sandbox(sandbox_id).fs.move_files(source, destination))
        return f"{source} moved to {destination}"

    @server.tool()
    async def delete_file(sandbox_id: str, path: str, recursive: bool = False) -> str:
        """Delete a file (or, with recursive, a directory) in a sandbox."""
        await off_loop(lambda: sandbox(sandbox_id).fs.delete_file(path, recursive=recursive))
        return f"{path} deleted"

    @server.tool()
    async def create_folder(sandbox_id: str, path: str, mode: str = "755") -> str:
        """Create a directory in a sandbox."""
        await off_loop(lambda: sandbox(sandbox_id).fs.create_folder(path, mode))
        return f"{path} created"

    @server.tool()
    async def get_file_info(sandbox_id: str, path: str) -> dict[str, Any]:
        """Size, mode, owner and modification time of a file in a sandbox."""
        info = await off_loop(lambda: sandbox(sandbox_id).fs.get_file_info(path))
        return record(info, ("name", "is_dir", "size", "mode", "owner", "group", "permissions", "mod_time"))

    @server.tool()
    async def git_clone(
        sandbox_id: str, url: str, path: str, branch: str | None = None, depth: int | None = None
    ) -> str:
        """Clone a git repository into a sandbox."""
        await off_loop(lambda: sandbox(sandbox_id).git.clone(url, path, branch=branch, depth=depth))
        return f"{url} cloned into {path}"

    @server.tool()
    async def preview_link(
        sandbox_id: str, port: int, expires_in_seconds: int | None = None
    ) -> dict[str, Any]:
        """The URL of a port in a sandbox: with a token header, or signed (token in the URL) if it expires."""

        def link() -> Any:
            found = sandbox(sandbox_id)
            if expires_in_seconds is None:
                return found.get_preview_link(port)
            return found.create_signed_preview_url(port, expires_in_seconds=expires_in_seconds)

        result = await off_loop(link)
        return {"url": result.url, "token": result.token}

    return server
