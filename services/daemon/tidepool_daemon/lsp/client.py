"""The LSP client: one language server process (pylsp, typescript-language-server) driven over JSON-RPC
on its stdio, with `Content-Length` framing, request/answer matching, its lifecycle (initialize, shutdown)
and document sync. The `/lsp/...` routes on top of it are in `service.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..errors import DaemonError, bad_request

logger = logging.getLogger("tidepool_daemon.lsp")

LSP_REQUEST_FAILED = "LSP_REQUEST_FAILED"
INITIALIZE_TIMEOUT_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 30.0
SHUTDOWN_TIMEOUT_SECONDS = 3.0
METHOD_NOT_FOUND = -32601
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024

# The languageId sent in didOpen for files of each extension.
_LANGUAGE_BY_EXTENSION = {
    ".py": "python",
    ".ts": "typescript",
    ".tsx": "typescriptreact",
    ".mts": "typescript",
    ".cts": "typescript",
    ".js": "javascript",
    ".jsx": "javascriptreact",
    ".mjs": "javascript",
    ".cjs": "javascript",
}


class LspProtocolError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _PendingRequest:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: Any = None
        self.error: dict[str, Any] | None = None


@dataclass
class _OpenDocument:
    language_id: str
    version: int
    text: str


@dataclass
class LanguageServer:
    """One running server process and the JSON-RPC plumbing around it."""

    family: str
    project: str
    process: subprocess.Popen[bytes]
    capabilities: dict[str, Any] = field(default_factory=dict)
    documents: dict[str, _OpenDocument] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # serialises document sync
    _write_lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: dict[int, _PendingRequest] = field(default_factory=dict)
    _pending_lock: threading.Lock = field(default_factory=threading.Lock)
    _next_id: int = 0
    _reader: threading.Thread | None = None
    _stderr_reader: threading.Thread | None = None

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read_loop, name=f"lsp-{self.family}", daemon=True)
        self._reader.start()
        self._stderr_reader = threading.Thread(target=self._drain_stderr, name="lsp-stderr", daemon=True)
        self._stderr_reader.start()

    def alive(self) -> bool:
        return self.process.poll() is None

    # -- JSON-RPC ---------------------------------------------------------------------------------

    def request(self, method: str, params: Any, timeout: float = REQUEST_TIMEOUT_SECONDS) -> Any:
        pending = _PendingRequest()
        with self._pending_lock:
            self._next_id += 1
            request_id = self._next_id
            self._pending[request_id] = pending
        try:
            self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            if not pending.event.wait(timeout):
                self.notify("$/cancelRequest", {"id": request_id})
                raise DaemonError(
                    504, f"language server did not answer {method} within {timeout:.0f}s", LSP_REQUEST_FAILED
                )
        finally:
            with self._pending_lock:
                self._pending.pop(request_id, None)
        if pending.error is not None:
            raise LspProtocolError(int(pending.error.get("code", 0)), str(pending.error.get("message", "")))
        return pending.result

    def notify(self, method: str, params: Any) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
        frame = b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        stdin = self.process.stdin
        assert stdin is not None
        with self._write_lock:
            try:
                stdin.write(frame)
                stdin.flush()
            except (OSError, ValueError):
                raise DaemonError(500, "the language server is not running", LSP_REQUEST_FAILED) from None

    def _read_loop(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while True:
                message = _read_message(stdout)
                if message is None:
                    break
                self._dispatch(message)
        except Exception:
            logger.exception("language server reader failed")
        finally:
            # Wake everybody still waiting: the server is gone.
            with self._pending_lock:
                pending = list(self._pending.values())
            for waiting in pending:
                waiting.error = {"code": -32099, "message": "the language server exited"}
                waiting.event.set()

    def _drain_stderr(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        with contextlib.suppress(OSError, ValueError):
            for line in stderr:
                logger.debug("%s lsp: %s", self.family, line.decode("utf-8", "replace").rstrip())

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "method" in message:
            if "id" in message:
                self._answer_server_request(message)
            return  # notifications (diagnostics, log messages, progress) are not needed
        request_id = message.get("id")
        with self._pending_lock:
            pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None:
            return
        if "error" in message and message["error"] is not None:
            pending.error = message["error"]
        else:
            pending.result = message.get("result")
        pending.event.set()

    def _answer_server_request(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        params = message.get("params") or {}
        result: Any = None
        if method == "workspace/configuration":
            result = [None for _ in params.get("items", [])]
        elif method == "workspace/workspaceFolders":
            result = [{"uri": path_to_uri(self.project), "name": os.path.basename(self.project) or "/"}]
        with contextlib.suppress(DaemonError):
            self._send({"jsonrpc": "2.0", "id": message["id"], "result": result})

    # -- lifecycle --------------------------------------------------------------------------------

    def initialize(self) -> None:
        root_uri = path_to_uri(self.project)
        params = {
            "processId": os.getpid(),
            "clientInfo": {"name": "tidepool-daemon"},
            "rootUri": root_uri,
            "rootPath": self.project,
            "workspaceFolders": [{"uri": root_uri, "name": os.path.basename(self.project) or "/"}],
            "capabilities": {
                "workspace": {
                    "configuration": True,
                    "workspaceFolders": True,
                    "symbol": {"dynamicRegistration": False},
                },
                "textDocument": {
                    "synchronization": {"didSave": False, "dynamicRegistration": False},
                    "completion": {
                        "completionItem": {
                            "snippetSupport": False,
                            "documentationFormat": ["markdown", "plaintext"],
                        },
                        "contextSupport": True,
                    },
                    "documentSymbol": {"hierarchicalDocumentSymbolSupport": True},
                },
            },
            "initializationOptions": {},
        }
        result = self.request("initialize", params, timeout=INITIALIZE_TIMEOUT_SECONDS)
        self.capabilities = (result or {}).get("capabilities") or {}
        self.notify("initialized", {})

    def shutdown(self) -> None:
        with contextlib.suppress(DaemonError, LspProtocolError):
            self.request("shutdown", None, timeout=SHUTDOWN_TIMEOUT_SECONDS)
        with contextlib.suppress(DaemonError):
            self.notify("exit", None)
        try:
            self.process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, 9)
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()

    # -- documents --------------------------------------------------------------------------------

    def sync_document(self, path: str, language_id: str | None = None) -> str:
        """Open `path` in the server (or re-sync it when the file changed on disk); returns its URI."""
        uri = path_to_uri(path)
        text = _read_text(path)
        with self.lock:
            document = self.documents.get(uri)
            if document is None:
                language = language_id or _LANGUAGE_BY_EXTENSION.get(os.path.splitext(path)[1], self.family)
                self.documents[uri] = _OpenDocument(language, 1, text)
                self.notify(
                    "textDocument/didOpen",
                    {"textDocument": {"uri": uri, "languageId": language, "version": 1, "text": text}},
                )
            elif document.text != text:
                document.version += 1
                document.text = text
                self.notify(
                    "textDocument/didChange",
                    {
                        "textDocument": {"uri": uri, "version": document.version},
                        "contentChanges": [{"text": text}],
                    },
                )
        return uri

    def close_document(self, path: str) -> None:
        uri = path_to_uri(path)
        with self.lock:
            if self.documents.pop(uri, None) is not None:
                self.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


def path_to_uri(path: str) -> str:
    return "file://" + quote(path, safe="/:@!$&'()*+,;=-._~")


def _read_text(path: str) -> str:
    try:
        if os.path.getsize(path) > MAX_DOCUMENT_BYTES:
            raise bad_request(f"file too large for the language server: {path}")
        with open(path, encoding="utf-8", errors="replace") as source:
            return source.read()
    except OSError as exc:
        raise DaemonError(404, f"file not found: {path}: {exc.strerror}", "FILE_NOT_FOUND") from None


def _read_message(stream: Any) -> dict[str, Any] | None:
    """One `Content-Length` framed JSON-RPC message from `stream`, or None at end of stream."""
    length: int | None = None
    while True:
        line = stream.readline()
        if not line:
            return None
        line = line.strip()
        if not line:
            if length is None:
                continue
            break
        name, _, value = line.decode("ascii", "replace").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = stream.read(length)
    if len(body) < length:
        return None
    message = json.loads(body.decode("utf-8", "replace"))
    return message if isinstance(message, dict) else {}
