"""`/lsp/...` against the real daemon with real language servers (pylsp; typescript-language-server).

Skipped when the server is not installed on this host; the SDK tests cover both in the default image.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

SAMPLE_PY = '''class Greeter:
    """Says hello."""

    def greet(self, name: str) -> str:
        return f"Hello, {name}!"

    def wave(self) -> None:
        pass


def make_greeter() -> Greeter:
    return Greeter()


greeter = make_greeter()
greeter.
'''

SAMPLE_TS = """export class Greeter {
  greet(name: string): string {
    return `Hello, ${name}!`;
  }
  wave(): void {}
}

export function makeGreeter(): Greeter {
  return new Greeter();
}

const greeter = makeGreeter();
greeter.
"""


@pytest.fixture
def pylsp_daemon_client(
    socket_dir: Path, launch_daemon: Callable[[Path], contextlib.AbstractContextManager[Path]]
) -> Iterator[httpx.Client]:
    """A daemon that finds pylsp on its PATH: the host's, else the test environment's (python-lsp-server,
    a dev dependency, as python3-pylsp is in the sandbox image). Missing, the test fails."""
    found = shutil.which("pylsp") or shutil.which("pylsp", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("pylsp is missing: install the dev extras (`make venv`)")
    path = f"{Path(found).parent}:{os.environ['PATH']}"
    with launch_daemon(socket_dir / "toolbox.sock", {"PATH": path}) as socket_path:
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://daemon", timeout=30.0) as client:
            yield client


def lsp_body(language: str, project: str, **extra: Any) -> dict[str, Any]:
    return {"languageId": language, "pathToProject": project, **extra}


@pytest.fixture
def python_project(work_dir: Path) -> Path:
    project = work_dir / "lsp-project"
    project.mkdir()
    (project / "sample.py").write_text(SAMPLE_PY)
    (project / "other.py").write_text("class OtherGreeterHelper:\n    pass\n")
    return project


def test_requests_before_start_are_400(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "p").mkdir()
    body = lsp_body("python", "p", uri="file://p/x.py")
    for response in (
        daemon_client.post("/lsp/did-open", json=body),
        daemon_client.post("/lsp/completions", json={**body, "position": {"line": 0, "character": 0}}),
        daemon_client.get("/lsp/document-symbols", params=body),
        daemon_client.get("/lsp/workspacesymbols", params=lsp_body("python", "p", query="x")),
        daemon_client.post("/lsp/stop", json=lsp_body("python", "p")),
    ):
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "LSP_SERVER_NOT_INITIALIZED"
        assert response.json()["source"] == "DAYTONA_DAEMON"


def test_invalid_requests(daemon_client: httpx.Client, work_dir: Path) -> None:
    assert daemon_client.post("/lsp/start", json=lsp_body("cobol", ".")).status_code == 400
    assert daemon_client.post("/lsp/start", json=lsp_body("python", "does-not-exist")).status_code == 400
    assert daemon_client.post("/lsp/start", json={"languageId": "python"}).status_code == 400


def test_python_language_server(pylsp_daemon_client: httpx.Client, python_project: Path) -> None:
    daemon_client = pylsp_daemon_client
    project = "lsp-project"  # relative to the work dir, as SDK users pass it
    uri = "file://lsp-project/sample.py"  # what the SDK builds from a relative path
    assert daemon_client.post("/lsp/start", json=lsp_body("python", project)).status_code == 200
    assert daemon_client.post("/lsp/start", json=lsp_body("python", project)).status_code == 200  # idempotent
    try:
        assert (
            daemon_client.post("/lsp/did-open", json=lsp_body("python", project, uri=uri)).status_code == 200
        )

        response = daemon_client.get("/lsp/document-symbols", params=lsp_body("python", project, uri=uri))
        assert response.status_code == 200, response.text
        symbols = response.json()
        by_name = {symbol["name"]: symbol for symbol in symbols}
        assert {"Greeter", "greet", "make_greeter"} <= set(by_name)
        greeter = by_name["Greeter"]
        assert greeter["kind"] == 5  # SymbolKind.Class
        assert greeter["location"]["uri"] == f"file://{python_project}/sample.py"
        assert greeter["location"]["range"]["start"] == {"line": 0, "character": 0}

        response = daemon_client.get(
            "/lsp/workspacesymbols", params=lsp_body("python", project, query="Greeter")
        )
        assert response.status_code == 200, response.text
        names = {symbol["name"] for symbol in response.json()}
        assert {"Greeter", "OtherGreeterHelper"} <= names
        assert all("greeter" in name.lower() for name in names)

        completion = lsp_body("python", project, uri=uri, position={"line": 15, "character": 8})
        response = daemon_client.post("/lsp/completions", json=completion)
        assert response.status_code == 200, response.text
        result = response.json()
        assert isinstance(result["isIncomplete"], bool)
        labels = {item["label"] for item in result["items"]}
        assert any(label.startswith("greet") for label in labels), labels
        assert any(label.startswith("wave") for label in labels), labels
        for item in result["items"]:
            assert isinstance(item.get("kind", 0), int)
            assert item.get("documentation") is None or isinstance(item["documentation"], dict)

        # Edits on disk are picked up without another did_open.
        (python_project / "sample.py").write_text(SAMPLE_PY.replace("def wave", "def salute"))
        labels = {
            item["label"] for item in daemon_client.post("/lsp/completions", json=completion).json()["items"]
        }
        assert any(label.startswith("salute") for label in labels), labels

        assert (
            daemon_client.post("/lsp/did-close", json=lsp_body("python", project, uri=uri)).status_code == 200
        )
    finally:
        assert daemon_client.post("/lsp/stop", json=lsp_body("python", project)).status_code == 200
    response = daemon_client.get("/lsp/document-symbols", params=lsp_body("python", project, uri=uri))
    assert response.json()["code"] == "LSP_SERVER_NOT_INITIALIZED"


def test_absolute_project_and_uri(pylsp_daemon_client: httpx.Client, python_project: Path) -> None:
    daemon_client = pylsp_daemon_client
    body = lsp_body("python", str(python_project))
    assert daemon_client.post("/lsp/start", json=body).status_code == 200
    try:
        params = {**body, "uri": f"file://{python_project}/sample.py"}
        names = {
            symbol["name"] for symbol in daemon_client.get("/lsp/document-symbols", params=params).json()
        }
        assert "Greeter" in names
        missing = daemon_client.get(
            "/lsp/document-symbols", params={**body, "uri": "file://lsp-project/nope.py"}
        )
        assert missing.status_code == 404
    finally:
        daemon_client.post("/lsp/stop", json=body)


@pytest.fixture
def typescript_language_server(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("typescript-language-server"):
        return
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.fail("typescript-language-server is not installed and npm is missing to install it")
    prefix = tmp_path_factory.mktemp("tsls")
    install = subprocess.run(
        [
            "npm",
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "typescript@5.9.3",
            "typescript-language-server@4.4.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if install.returncode != 0:
        pytest.fail(f"could not install typescript-language-server: {install.stderr[-500:]}")
    monkeypatch.setenv("PATH", f"{prefix / 'node_modules' / '.bin'}:{os.environ['PATH']}")


@pytest.fixture
def ts_daemon_client(
    typescript_language_server: None,
    socket_dir: Path,
    launch_daemon: Callable[[Path], contextlib.AbstractContextManager[Path]],
) -> Iterator[httpx.Client]:
    with launch_daemon(socket_dir / "toolbox.sock") as socket_path:
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://daemon", timeout=90.0) as client:
            yield client


def test_typescript_language_server(ts_daemon_client: httpx.Client, work_dir: Path) -> None:
    project = work_dir / "ts-project"
    project.mkdir()
    (project / "sample.ts").write_text(SAMPLE_TS)
    client = ts_daemon_client
    body = lsp_body("typescript", "ts-project")
    uri = "file://ts-project/sample.ts"
    assert client.post("/lsp/start", json=body).status_code == 200
    try:
        assert client.post("/lsp/did-open", json={**body, "uri": uri}).status_code == 200
        symbols = client.get("/lsp/document-symbols", params={**body, "uri": uri}).json()
        by_name = {symbol["name"]: symbol for symbol in symbols}
        assert {"Greeter", "greet", "makeGreeter"} <= set(by_name)
        assert by_name["Greeter"]["kind"] == 5

        workspace = client.get("/lsp/workspacesymbols", params={**body, "query": "Greeter"}).json()
        assert "Greeter" in {symbol["name"] for symbol in workspace}

        completion = {
            **body,
            "uri": uri,
            "position": {"line": 12, "character": 8},
            "context": {"triggerKind": 2, "triggerCharacter": "."},
        }
        response = client.post("/lsp/completions", json=completion)
        assert response.status_code == 200, response.text
        labels = {item["label"] for item in response.json()["items"]}
        assert {"greet", "wave"} <= labels
        assert client.post("/lsp/did-close", json={**body, "uri": uri}).status_code == 200
    finally:
        assert client.post("/lsp/stop", json=body).status_code == 200
