"""Issue #16: `tidepool mcp` driven by the official `mcp` client SDK against a live stack.

Over stdio (the server is the installed `tidepool mcp`, spawned by the client) and over streamable HTTP
(`tidepool mcp --http --port N`): tools/list shows every tool with its input schema, a sandbox is created,
a command runs, files go up and down and move, and the sandbox is destroyed; an API failure comes back as
a tool error, not a crash."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

TIDEPOOL = str(Path(sys.executable).parent / "tidepool")
TOOLS = {
    "create_sandbox",
    "destroy_sandbox",
    "execute_command",
    "upload_file",
    "download_file",
    "list_files",
    "move_file",
    "delete_file",
    "create_folder",
    "get_file_info",
    "git_clone",
    "preview_link",
}


def api_env() -> dict[str, str]:
    return {name: os.environ[name] for name in ("DAYTONA_API_URL", "DAYTONA_API_KEY")}


@asynccontextmanager
async def stdio_session() -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=TIDEPOOL, args=["mcp"], env=api_env())
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def http_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [TIDEPOOL, "mcp", "--http", "--port", str(port)],
        env={**os.environ, **api_env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        assert process.poll() is None, "tidepool mcp --http exited"
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, timeout=60)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    result = await session.call_tool(tool, arguments)
    text = "".join(getattr(block, "text", "") for block in result.content)
    assert not result.is_error, f"{tool}: {text}"
    structured = result.structured_content
    if isinstance(structured, dict) and set(structured) == {"result"}:
        return structured["result"]
    return structured if structured is not None else text


async def exercise(session: ClientSession) -> None:
    listed = await session.list_tools()
    assert {tool.name for tool in listed.tools} == TOOLS
    for tool in listed.tools:
        assert tool.input_schema["type"] == "object" and tool.description
    schema = {tool.name: tool.input_schema for tool in listed.tools}
    assert set(schema["execute_command"]["required"]) == {"sandbox_id", "command"}

    sandbox = await call(session, "create_sandbox", labels={"suite": "mcp"})
    assert sandbox["state"] == "started"
    sandbox_id = sandbox["id"]
    try:
        ran = await call(session, "execute_command", sandbox_id=sandbox_id, command="echo hi; exit 4")
        assert ran == {"exit_code": 4, "output": "hi\n"} or (
            ran["exit_code"] == 4 and ran["output"].strip() == "hi"
        )

        await call(session, "create_folder", sandbox_id=sandbox_id, path="/tmp/mcp")
        await call(session, "upload_file", sandbox_id=sandbox_id, path="/tmp/mcp/a.txt", content="hello mcp")
        await call(
            session, "move_file", sandbox_id=sandbox_id, source="/tmp/mcp/a.txt", destination="/tmp/mcp/b.txt"
        )
        names = [
            entry["name"]
            for entry in await call(session, "list_files", sandbox_id=sandbox_id, path="/tmp/mcp")
        ]
        assert names == ["b.txt"]
        info = await call(session, "get_file_info", sandbox_id=sandbox_id, path="/tmp/mcp/b.txt")
        assert info["size"] == len("hello mcp") and not info["is_dir"]
        assert (
            await call(session, "download_file", sandbox_id=sandbox_id, path="/tmp/mcp/b.txt") == "hello mcp"
        )
        binary = await call(
            session,
            "upload_file",
            sandbox_id=sandbox_id,
            path="/tmp/mcp/bin",
            content="AAEC/w==",
            encoding="base64",
        )
        assert "4 bytes" in binary
        assert await call(
            session, "download_file", sandbox_id=sandbox_id, path="/tmp/mcp/bin", encoding="base64"
        ) == ("AAEC/w==")
        await call(session, "delete_file", sandbox_id=sandbox_id, path="/tmp/mcp/b.txt")
        missing = await session.call_tool(
            "get_file_info", {"sandbox_id": sandbox_id, "path": "/tmp/mcp/b.txt"}
        )
        assert missing.is_error

        link = await call(session, "preview_link", sandbox_id=sandbox_id, port=3000)
        assert link["url"].startswith("http") and sandbox_id in link["url"]
    finally:
        await call(session, "destroy_sandbox", sandbox_id=sandbox_id)

    gone = await session.call_tool("execute_command", {"sandbox_id": "no-such-sandbox", "command": "true"})
    assert gone.is_error
    assert json.dumps([block.model_dump() for block in gone.content])  # a readable message, not a crash


async def test_mcp_over_stdio() -> None:
    async with stdio_session() as session:
        await exercise(session)


async def test_mcp_over_streamable_http(http_server: str) -> None:
    async with streamable_http_client(http_server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await exercise(session)
