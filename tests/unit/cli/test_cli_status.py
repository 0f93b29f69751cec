"""Issue #16: `tidepool status` reads `up`'s pid file and env file and asks the API's /health."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tidepool_stack.cli import app


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        healthy = self.path == "/api/health"
        self.send_response(200 if healthy else 404)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}' if healthy else b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def test_status_is_0_when_up_runs_and_its_api_answers(tmp_path: Path, api_url: str) -> None:
    (tmp_path / "stack.pid").write_text(str(os.getpid()))
    (tmp_path / "env").write_text(f"export DAYTONA_API_URL={api_url}\nexport DAYTONA_API_KEY=k\n")
    result = CliRunner().invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Tidepool is up" in result.output and api_url in result.output


def test_status_is_9_when_the_api_does_not_answer(tmp_path: Path) -> None:
    (tmp_path / "stack.pid").write_text(str(os.getpid()))
    (tmp_path / "env").write_text("export DAYTONA_API_URL=http://127.0.0.1:9/api\n")
    result = CliRunner().invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 9 and "does not answer" in result.output


def test_status_is_9_when_the_recorded_process_is_gone(tmp_path: Path) -> None:
    (tmp_path / "stack.pid").write_text("999999999")
    result = CliRunner().invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 9 and "not running" in result.output
