"""The route table: every route of the Toolbox API and the handler serving it. Read this file for the map
of the API; each handler lives in its feature package (`fs/`, `process/`, `git/`, `lsp/`) or, for the
small ones, next to this file (`info.py`, `system.py`, `environment.py`).
"""

from __future__ import annotations

from .context import DaemonContext
from .environment import EnvironmentService
from .fs.files import FileSystemService
from .fs.search import SearchService
from .fs.transfer import FileTransferService
from .git.service import GitService
from .httpd.routing import Router
from .info import InfoService
from .lsp.service import LspService
from .process.coderun import CodeRunService
from .process.execute import ProcessService
from .process.interpreter import InterpreterService
from .process.pty_sessions import PtyService
from .process.sessions import SessionService
from .process.termination import list_terminations
from .system import SystemService


def build_router(context: DaemonContext) -> Router:
    info = InfoService(context)
    files = FileSystemService(context)
    transfer = FileTransferService(context)
    process = ProcessService(context)

    router = Router()
    router.add("GET", "/version", info.version)
    router.add("GET", "/user-home-dir", info.user_home_dir)
    router.add("GET", "/work-dir", info.work_dir)

    router.add("GET", "/files", files.list_files)
    router.add("DELETE", "/files", files.delete_file)
    router.add("GET", "/files/info", files.get_file_info)
    router.add("POST", "/files/folder", files.create_folder)
    router.add("POST", "/files/bulk-upload", transfer.bulk_upload)
    router.add("POST", "/files/bulk-download", transfer.bulk_download)
    router.add("GET", "/files/download", transfer.download)
    router.add("POST", "/files/upload-v2", transfer.upload_v2)
    router.add("POST", "/files/move", files.move_file)
    router.add("POST", "/files/permissions", files.set_file_permissions)
    router.add("GET", "/files/find", SearchService(context).find_in_files)
    router.add("GET", "/files/search", SearchService(context).search_files)
    router.add("POST", "/files/replace", SearchService(context).replace_in_files)
    router.add("POST", "/env", EnvironmentService().update_env)
    router.add("POST", "/init", EnvironmentService().initialize)
    router.add("GET", "/system/metrics", SystemService().metrics)
    router.add("GET", "/port", SystemService().ports)
    router.add("GET", "/port/{port}/in-use", SystemService().port_in_use)

    router.add("POST", "/process/execute", process.execute)
    router.add("GET", "/process/terminations", list_terminations)

    sessions = SessionService(context)
    # Literal routes before the `{sessionId}` templates: the first match wins.
    router.add("GET", "/process/session/entrypoint", sessions.entrypoint_session)
    router.add("GET", "/process/session/entrypoint/logs", sessions.entrypoint_logs)
    router.add("POST", "/process/session", sessions.create_session)
    router.add("GET", "/process/session", sessions.list_sessions)
    router.add("GET", "/process/session/{sessionId}", sessions.get_session)
    router.add("DELETE", "/process/session/{sessionId}", sessions.delete_session)
    router.add("POST", "/process/session/{sessionId}/exec", sessions.execute)
    router.add("GET", "/process/session/{sessionId}/command/{commandId}", sessions.get_command)
    router.add("GET", "/process/session/{sessionId}/command/{commandId}/logs", sessions.command_logs)
    router.add("POST", "/process/session/{sessionId}/command/{commandId}/input", sessions.send_input)

    pty = PtyService(context)
    router.add("GET", "/process/pty/create-connect", pty.create_connect)
    router.add("POST", "/process/pty", pty.create)
    router.add("GET", "/process/pty", pty.list_sessions)
    router.add("GET", "/process/pty/{sessionId}", pty.get_session)
    router.add("DELETE", "/process/pty/{sessionId}", pty.delete)
    router.add("GET", "/process/pty/{sessionId}/connect", pty.connect)
    router.add("POST", "/process/pty/{sessionId}/resize", pty.resize)

    router.add("POST", "/process/code-run", CodeRunService(context).code_run)

    interpreter = InterpreterService(context)
    router.add("POST", "/process/interpreter/context", interpreter.create_context)
    router.add("GET", "/process/interpreter/context", interpreter.list_contexts)
    router.add("DELETE", "/process/interpreter/context/{id}", interpreter.delete_context)
    router.add("GET", "/process/interpreter/execute", interpreter.execute)

    git = GitService(context)
    router.add("POST", "/git/clone", git.clone)
    router.add("GET", "/git/status", git.status)
    router.add("GET", "/git/branches", git.list_branches)
    router.add("POST", "/git/branches", git.create_branch)
    router.add("DELETE", "/git/branches", git.delete_branch)
    router.add("POST", "/git/checkout", git.checkout)
    router.add("POST", "/git/add", git.add)
    router.add("POST", "/git/commit", git.commit)
    router.add("POST", "/git/push", git.push)
    router.add("POST", "/git/pull", git.pull)
    router.add("GET", "/git/history", git.history)
    router.add("POST", "/git/init", git.init)
    router.add("POST", "/git/reset", git.reset)
    router.add("POST", "/git/restore", git.restore)
    router.add("POST", "/git/remotes", git.add_remote)
    router.add("GET", "/git/remotes", git.list_remotes)
    router.add("POST", "/git/config", git.set_config)
    router.add("GET", "/git/config", git.get_config)
    router.add("POST", "/git/config/user", git.configure_user)
    router.add("POST", "/git/credentials", git.authenticate)

    lsp = LspService(context)
    router.add("POST", "/lsp/start", lsp.start)
    router.add("POST", "/lsp/stop", lsp.stop)
    router.add("POST", "/lsp/did-open", lsp.did_open)
    router.add("POST", "/lsp/did-close", lsp.did_close)
    router.add("POST", "/lsp/completions", lsp.completions)
    router.add("GET", "/lsp/document-symbols", lsp.document_symbols)
    router.add("GET", "/lsp/workspacesymbols", lsp.workspace_symbols)
    router.add("GET", "/lsp/workspace-symbols", lsp.workspace_symbols)  # the deprecated spelling
    return router
