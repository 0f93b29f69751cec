"""`/lsp/...`: language servers (pylsp, typescript-language-server) driven over JSON-RPC on stdio.

One server runs per (language, project directory); `start` launches and initialises it, `stop` shuts it
down. Requests for a server that was not started answer 400 `LSP_SERVER_NOT_INITIALIZED`.

Paths: a relative `pathToProject` and the SDK's `file://<relative path>` URIs (it builds them as
`"file://" + path`) resolve against the work dir; the language server only ever sees absolute
`file:///...` URIs. Before a document request the file is re-read from disk and re-synced when it
changed, so edits made through the file API are seen without another `did_open`.

Results are normalised to the SDK's models: completions to `{isIncomplete, items[]}`, symbols to a flat
`[{name, kind, location{uri, range}}]` (hierarchical document symbols are flattened). When a server has no
workspace-symbol support (bookworm's pylsp 1.7), workspace symbols are computed from the document
symbols of the project's source files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from ..context import DaemonContext
from ..errors import DaemonError, bad_request
from ..httpd.http_io import Request, Response, json_response
from ..process.proctree import expose_to_oom_killer
from ..process.spawn_env import build_environment
from .client import (
    LSP_REQUEST_FAILED,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT_SECONDS,
    LanguageServer,
    LspProtocolError,
    path_to_uri,
)

LSP_SERVER_NOT_INITIALIZED = "LSP_SERVER_NOT_INITIALIZED"
# Workspace-symbol fallback: how many source files at most are asked for their symbols.
MAX_FALLBACK_FILES = 300
_SKIPPED_DIRECTORIES = {
    ".git",
    "node_modules",
    "__pycache__",
    ".venv",
    "venv",
    ".tox",
    "dist",
    "build",
    ".mypy_cache",
}

# languageId -> server family, and the source files of each family
_SERVER_FAMILY = {"python": "python", "typescript": "typescript", "javascript": "typescript"}
_SOURCE_EXTENSIONS = {
    "python": (".py",),
    "typescript": (".ts", ".tsx", ".js", ".jsx", ".mts", ".cts", ".mjs", ".cjs"),
}


class LspService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context
        self._servers: dict[tuple[str, str], LanguageServer] = {}
        self._lock = threading.Lock()
        self._starting: dict[tuple[str, str], threading.Lock] = {}

    # -- endpoints --------------------------------------------------------------------------------

    def start(self, request: Request) -> Response:
        payload = request.json_object_body()
        family, language_id = _family(payload.get("languageId"))
        project = self._project(payload.get("pathToProject"))
        key = (family, project)
        with self._lock:
            start_lock = self._starting.setdefault(key, threading.Lock())
        with start_lock:
            with self._lock:
                existing = self._servers.get(key)
            if existing is not None and existing.alive():
                return json_response(200, {})
            server = self._launch(family, project)
            try:
                server.initialize()
            except (DaemonError, LspProtocolError) as exc:
                server.shutdown()
                raise DaemonError(
                    500,
                    f"failed to initialise the {language_id} language server: {exc.message}",
                    LSP_REQUEST_FAILED,
                ) from None
            with self._lock:
                self._servers[key] = server
        return json_response(200, {})

    def stop(self, request: Request) -> Response:
        payload = request.json_object_body()
        family, _ = _family(payload.get("languageId"))
        project = self._project(payload.get("pathToProject"))
        with self._lock:
            server = self._servers.pop((family, project), None)
        if server is None:
            raise _not_initialized(payload.get("languageId"), payload.get("pathToProject"))
        server.shutdown()
        return json_response(200, {})

    def did_open(self, request: Request) -> Response:
        payload = request.json_object_body()
        server, path = self._document_target(payload)
        language_id = payload.get("languageId") if isinstance(payload.get("languageId"), str) else None
        # A typescript server opening a .js file still wants "javascript" as its language id.
        if language_id in ("typescript", "javascript"):
            language_id = None
        server.sync_document(path, language_id)
        return json_response(200, {})

    def did_close(self, request: Request) -> Response:
        payload = request.json_object_body()
        server, path = self._document_target(payload, must_exist=False)
        server.close_document(path)
        return json_response(200, {})

    def completions(self, request: Request) -> Response:
        payload = request.json_object_body()
        server, path = self._document_target(payload)
        position = _position(payload.get("position"))
        uri = server.sync_document(path)
        params: dict[str, Any] = {"textDocument": {"uri": uri}, "position": position}
        context = payload.get("context")
        if isinstance(context, dict) and isinstance(context.get("triggerKind"), int):
            params["context"] = {
                key: value for key, value in context.items() if key in ("triggerKind", "triggerCharacter")
            }
        result = self._call(server, "textDocument/completion", params)
        return json_response(200, normalize_completions(result))

    def document_symbols(self, request: Request) -> Response:
        payload = {
            "languageId": request.query_value("languageId"),
            "pathToProject": request.query_value("pathToProject"),
            "uri": request.query_value("uri"),
        }
        server, path = self._document_target(payload)
        uri = server.sync_document(path)
        result = self._call(server, "textDocument/documentSymbol", {"textDocument": {"uri": uri}})
        return json_response(200, normalize_symbols(result, uri))

    def workspace_symbols(self, request: Request) -> Response:
        family, _ = _family(request.query_value("languageId"))
        project = self._project(request.query_value("pathToProject"))
        server = self._server(
            family, project, request.query_value("languageId"), request.query_value("pathToProject")
        )
        query = request.query_value("query") or ""
        symbols: list[dict[str, Any]] | None = None
        if server.capabilities.get("workspaceSymbolProvider"):
            try:
                symbols = normalize_symbols(server.request("workspace/symbol", {"query": query}), None)
            except LspProtocolError as exc:
                if exc.code != METHOD_NOT_FOUND:
                    raise DaemonError(
                        500, f"workspace/symbol failed: {exc.message}", LSP_REQUEST_FAILED
                    ) from None
        if not symbols:
            symbols = self._workspace_symbols_from_documents(server, query)
        return json_response(200, symbols)

    # -- helpers ----------------------------------------------------------------------------------

    def _launch(self, family: str, project: str) -> LanguageServer:
        command = _server_command(family)
        if command is None:
            binary = "pylsp" if family == "python" else "typescript-language-server"
            raise DaemonError(400, f"{binary} is not installed in this sandbox", LSP_REQUEST_FAILED)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=project,
                env=build_environment(self._context),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise DaemonError(
                500, f"failed to start the language server: {exc}", LSP_REQUEST_FAILED
            ) from None
        expose_to_oom_killer(process.pid)
        server = LanguageServer(family=family, project=project, process=process)
        server.start_reader()
        return server

    def _project(self, raw: object) -> str:
        if not isinstance(raw, str) or not raw:
            raise bad_request("pathToProject is required")
        project = self._context.resolve_path(raw)
        if not os.path.isdir(project):
            raise bad_request(f"project directory does not exist: {raw}")
        return project

    def _server(self, family: str, project: str, raw_language: object, raw_project: object) -> LanguageServer:
        with self._lock:
            server = self._servers.get((family, project))
        if server is None:
            raise _not_initialized(raw_language, raw_project)
        if not server.alive():
            with self._lock:
                if self._servers.get((family, project)) is server:
                    del self._servers[(family, project)]
            raise _not_initialized(raw_language, raw_project, "the language server exited; start it again")
        return server

    def _document_target(
        self, payload: dict[str, Any], *, must_exist: bool = True
    ) -> tuple[LanguageServer, str]:
        family, _ = _family(payload.get("languageId"))
        raw_project = payload.get("pathToProject")
        if not isinstance(raw_project, str) or not raw_project:
            raise bad_request("pathToProject is required")
        project = self._context.resolve_path(raw_project)
        server = self._server(family, project, payload.get("languageId"), raw_project)
        path = self.uri_to_path(payload.get("uri"))
        if must_exist and not os.path.isfile(path):
            raise DaemonError(404, f"file not found: {payload.get('uri')}", "FILE_NOT_FOUND")
        return server, path

    def uri_to_path(self, raw_uri: object) -> str:
        """`file://rel/x.py` (the SDK's form), `file:///abs/x.py` or a bare path -> absolute path."""
        if not isinstance(raw_uri, str) or not raw_uri:
            raise bad_request("uri is required")
        if not raw_uri.startswith("file://"):
            return self._context.resolve_path(raw_uri)
        remainder = raw_uri[len("file://") :]
        if remainder.startswith("localhost/"):
            remainder = remainder[len("localhost") :]
        # The SDK sends paths unencoded; LSP-style URIs are percent-encoded. Decode only when needed.
        raw_path = remainder
        if "%" in remainder and not os.path.exists(self._context.resolve_path(remainder)):
            raw_path = unquote(remainder)
        return self._context.resolve_path(raw_path)

    def _call(self, server: LanguageServer, method: str, params: dict[str, Any]) -> Any:
        try:
            return server.request(method, params)
        except LspProtocolError as exc:
            raise DaemonError(500, f"{method} failed: {exc.message}", LSP_REQUEST_FAILED) from None

    def _workspace_symbols_from_documents(self, server: LanguageServer, query: str) -> list[dict[str, Any]]:
        needle = query.lower()
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
        for path in _source_files(server.project, server.family):
            if time.monotonic() > deadline:
                break
            uri = path_to_uri(path)
            was_open = uri in server.documents
            try:
                server.sync_document(path)
                result = server.request("textDocument/documentSymbol", {"textDocument": {"uri": uri}})
            except (DaemonError, LspProtocolError, OSError):
                continue
            finally:
                if not was_open:
                    with contextlib.suppress(DaemonError):
                        server.close_document(path)
            found.extend(
                symbol for symbol in normalize_symbols(result, uri) if needle in symbol["name"].lower()
            )
        return found


def _family(raw: object) -> tuple[str, str]:
    if not isinstance(raw, str) or not raw:
        raise bad_request("languageId is required")
    language = raw.strip().lower()
    family = _SERVER_FAMILY.get(language)
    if family is None:
        raise bad_request(f"unsupported languageId {raw!r}; supported: python, typescript, javascript")
    return family, language


def _not_initialized(raw_language: object, raw_project: object, detail: str = "") -> DaemonError:
    message = f"no {raw_language} language server started for {raw_project}; call start first"
    if detail:
        message = f"{message} ({detail})"
    return DaemonError(400, message, LSP_SERVER_NOT_INITIALIZED)


def _server_command(family: str) -> list[str] | None:
    if family == "python":
        pylsp = shutil.which("pylsp")
        if pylsp:
            return [pylsp]
        python = shutil.which("python3")  # the image's: pylsp must see the user's packages
        if python is None:
            return None
        probe = subprocess.run([python, "-c", "import pylsp"], capture_output=True, check=False)
        return [python, "-m", "pylsp"] if probe.returncode == 0 else None
    server = shutil.which("typescript-language-server")
    return [server, "--stdio"] if server else None


def _position(raw: object) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise bad_request("position {line, character} is required")
    line, character = raw.get("line"), raw.get("character")
    if not all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in (line, character)
    ):
        raise bad_request("position.line and position.character must be non-negative integers")
    return {"line": int(line), "character": int(character)}  # type: ignore[arg-type]


def _source_files(project: str, family: str) -> Iterator[str]:
    extensions = _SOURCE_EXTENSIONS[family]
    count = 0
    for directory, subdirectories, files in os.walk(project):
        subdirectories[:] = sorted(name for name in subdirectories if name not in _SKIPPED_DIRECTORIES)
        for name in sorted(files):
            if name.endswith(extensions) and not name.endswith(".d.ts"):
                yield os.path.join(directory, name)
                count += 1
                if count >= MAX_FALLBACK_FILES:
                    return


def normalize_completions(result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        raw_items = result.get("items") or []
        incomplete = bool(result.get("isIncomplete", False))
    elif isinstance(result, list):
        raw_items, incomplete = result, False
    else:
        raw_items, incomplete = [], False
    items = []
    for raw in raw_items:
        if not isinstance(raw, dict) or not isinstance(raw.get("label"), str):
            continue
        item: dict[str, Any] = {"label": raw["label"]}
        if isinstance(raw.get("kind"), int) and not isinstance(raw.get("kind"), bool):
            item["kind"] = raw["kind"]
        for key in ("detail", "sortText", "filterText", "insertText"):
            if isinstance(raw.get(key), str):
                item[key] = raw[key]
        if "insertText" not in item and isinstance(raw.get("textEdit"), dict):
            new_text = raw["textEdit"].get("newText")
            if isinstance(new_text, str):
                item["insertText"] = new_text
        documentation = raw.get("documentation")
        if isinstance(documentation, str):
            item["documentation"] = {"kind": "plaintext", "value": documentation}
        elif isinstance(documentation, dict):
            item["documentation"] = documentation
        items.append(item)
    return {"isIncomplete": incomplete, "items": items}


def normalize_symbols(result: Any, document_uri: str | None) -> list[dict[str, Any]]:
    """SymbolInformation[] / DocumentSymbol[] / WorkspaceSymbol[] -> the SDK's flat LspSymbol list."""
    symbols: list[dict[str, Any]] = []

    def visit(raw: Any) -> None:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            return
        kind = raw.get("kind")
        if not isinstance(kind, int) or isinstance(kind, bool):
            kind = 0
        location = raw.get("location")
        if isinstance(location, dict) and isinstance(location.get("uri"), str):
            uri, symbol_range = location["uri"], location.get("range")
        else:
            uri, symbol_range = document_uri or "", raw.get("selectionRange") or raw.get("range")
        symbols.append(
            {"name": raw["name"], "kind": kind, "location": {"uri": uri, "range": _range(symbol_range)}}
        )
        for child in raw.get("children") or []:
            visit(child)

    for entry in result if isinstance(result, list) else []:
        visit(entry)
    return symbols


def _range(raw: Any) -> dict[str, dict[str, int]]:
    def point(value: Any) -> dict[str, int]:
        value = value if isinstance(value, dict) else {}
        line, character = value.get("line", 0), value.get("character", 0)
        return {
            "line": line if isinstance(line, int) else 0,
            "character": character if isinstance(character, int) else 0,
        }

    raw = raw if isinstance(raw, dict) else {}
    return {"start": point(raw.get("start")), "end": point(raw.get("end"))}
