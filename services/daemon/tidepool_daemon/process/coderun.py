"""`POST /process/code-run`: run a snippet in a fresh interpreter for the sandbox's language.

* python: `python3 -u -c <coderun_bootstrap.py> <charts file> argv...` with the code on stdin, which behaves
  like upstream's `python3 -u - argv...` and adds matplotlib chart capture through a side-channel file
  (never stdout), returned as `artifacts.charts`.
* javascript: `node --require coderun_started.js - argv...` with the code on stdin (the preload reports
  when the user's code starts, as the Python bootstrap does; ts-node preloads it too).
* typescript: `ts-node --transpile-only -O '{"module":"commonjs"}' -e <code> - argv...` (upstream runs
  ts-node as well); code too large for one argv string goes through a temporary file instead.

`result` is the program's combined stdout+stderr only, `exitCode` its exit status; a timeout answers 408
`PROCESS_EXECUTION_TIMEOUT` exactly like `/process/execute`, and `termination` is recorded the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..context import DaemonContext
from ..errors import PROCESS_EXECUTION_TIMEOUT, DaemonError, bad_request
from ..httpd.http_io import Request, Response, json_response
from .execute import TIMEOUT_MESSAGE, CommandOutcome, _parse_timeout, _ShellRun
from .proctree import TreeSpec
from .spawn_env import build_environment

PYTHON_BOOTSTRAP = (Path(__file__).with_name("coderun_bootstrap.py")).read_text(encoding="utf-8")
# Preloaded into node and ts-node: reports when the user's code starts (see run_program).
NODE_STARTED_PRELOAD = str(Path(__file__).with_name("coderun_started.js"))
SUPPORTED_LANGUAGES = ("python", "javascript", "typescript")
LANGUAGE_ALIASES = {
    "py": "python",
    "python3": "python",
    "js": "javascript",
    "node": "javascript",
    "ts": "typescript",
}
# Linux caps one argv string at 128 KiB (MAX_ARG_STRLEN); stay well below it for `ts-node -e`.
MAX_INLINE_ARGUMENT_BYTES = 96 * 1024
# Charts are base64 PNGs; beyond this the side channel is ignored rather than loaded into memory.
MAX_CHARTS_FILE_BYTES = 64 * 1024 * 1024
TS_NODE_COMPILER_OPTIONS = '{"module":"commonjs"}'


class CodeRunService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    def code_run(self, request: Request) -> Response:
        payload = request.json_object_body()
        code = payload.get("code")
        if not isinstance(code, str):
            raise bad_request("code is required and must be a string")
        language = _parse_language(payload.get("language"))
        argv = _parse_argv(payload.get("argv"))
        env = build_environment(self._context, payload.get("envs"))
        timeout_seconds = _parse_timeout(payload.get("timeout"))

        with tempfile.TemporaryDirectory(prefix="tidepool-coderun-") as scratch:
            charts_path = os.path.join(scratch, "charts.jsonl")
            command, stdin = _command_for(language, code, argv, charts_path, scratch, env.get("PATH"))
            outcome = run_program(command, stdin, self._context.work_dir, env, timeout_seconds)
            charts = _read_charts(charts_path) if language == "python" else []

        if outcome.reason == "timeout":
            raise DaemonError(
                408, TIMEOUT_MESSAGE, PROCESS_EXECUTION_TIMEOUT, extra={"termination": outcome.termination()}
            )
        response: dict[str, Any] = {
            "exitCode": outcome.exit_code,
            "result": outcome.output.decode("utf-8", "replace"),
            "artifacts": {"charts": charts},
            "termination": outcome.termination(),
        }
        if outcome.output_truncated:
            response["outputTruncated"] = True
        return json_response(200, response)


def _parse_language(raw: object) -> str:
    if raw is None or raw == "":
        return "python"  # the SDK's default when the sandbox has no language label
    if not isinstance(raw, str):
        raise bad_request("language must be a string")
    language = LANGUAGE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if language not in SUPPORTED_LANGUAGES:
        raise bad_request(f"unsupported language {raw!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    return language


def _parse_argv(raw: object) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise bad_request("argv must be a list of strings")
    if any("\x00" in item for item in raw):
        raise bad_request("argv must not contain NUL bytes")
    return list(raw)


def _python_executable(search_path: str | None) -> str:
    # The user's python3 on PATH is what `python3 -u -` would run. Never the daemon's own (the toolbox
    # runtime is not the user's python): without one, the run ends as "python3: command not found".
    return shutil.which("python3", path=search_path) or "python3"


def _command_for(
    language: str, code: str, argv: list[str], charts_path: str, scratch: str, search_path: str | None
) -> tuple[list[str], bytes]:
    encoded = code.encode("utf-8", "surrogatepass")
    if language == "python":
        return [_python_executable(search_path), "-u", "-c", PYTHON_BOOTSTRAP, charts_path, *argv], encoded
    if language == "javascript":
        return ["node", "--require", NODE_STARTED_PRELOAD, "-", *argv], encoded
    ts_node = _ts_node_command(search_path)
    if len(encoded) <= MAX_INLINE_ARGUMENT_BYTES:
        # "-" fills argv[1] as `node -` does, so process.argv.slice(2) is the user's argv in every mode.
        return [*ts_node, "-e", code, "-", *argv], b""
    script = os.path.join(scratch, "main.ts")
    with open(script, "wb") as script_file:
        script_file.write(encoded)
    return [*ts_node, script, *argv], b""


def _ts_node_command(search_path: str | None) -> list[str]:
    options = ["--transpile-only", "-O", TS_NODE_COMPILER_OPTIONS, "--require", NODE_STARTED_PRELOAD]
    if shutil.which("ts-node", path=search_path):
        return ["ts-node", *options]
    return ["npx", "--yes", "ts-node", *options]


def run_program(
    command: list[str], stdin: bytes, cwd: str, env: dict[str, str], timeout_seconds: float | None
) -> CommandOutcome:
    """Run `command` with `stdin` fed in (the program reads it to its end, so the user's code then sees
    end-of-file), stdout+stderr combined, the timeout ending its whole process tree (see proctree.py)."""
    tree = TreeSpec()
    child_env = tree.environment(dict(env))
    # The Python bootstrap (coderun_bootstrap._report_started) and the node preload (coderun_started.js)
    # report when the user's code starts: the timeout counts from there, so a slow interpreter start on a
    # busy machine (or ts-node fetched by npx) is never the user's time-out.
    started_read, started_write = -1, -1
    reports_start = command[2:4] == ["-c", PYTHON_BOOTSTRAP] or NODE_STARTED_PRELOAD in command
    if timeout_seconds is not None and reports_start:
        started_read, started_write = os.pipe()
        child_env["TIDEPOOL_CODE_RUN_STARTED_FD"] = str(started_write)
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=child_env,
            start_new_session=True,
            close_fds=True,
            pass_fds=(started_write,) if started_write >= 0 else (),
        )
    except (FileNotFoundError, OSError) as exc:
        for descriptor in (started_read, started_write):
            if descriptor >= 0:
                os.close(descriptor)
        if isinstance(exc, FileNotFoundError):
            return CommandOutcome(
                f"{command[0]}: command not found (this sandbox's image has no {command[0]})\n".encode(),
                127,
                "exited",
                None,
                output_truncated=False,
            )
        raise DaemonError(500, f"failed to start {command[0]}: {exc}") from None
    if started_write >= 0:
        os.close(started_write)
    started_fd = started_read if started_read >= 0 else None
    return _ShellRun(
        process, stdin, timeout_seconds, kind="code_run", tree=tree, started_fd=started_fd
    ).wait()


def _read_charts(charts_path: str) -> list[dict[str, Any]]:
    charts: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        if os.path.getsize(charts_path) > MAX_CHARTS_FILE_BYTES:
            return charts
        with open(charts_path, encoding="utf-8", errors="replace") as charts_file:
            for line in charts_file:
                with contextlib.suppress(ValueError):
                    chart = json.loads(line)
                    if isinstance(chart, dict):
                        charts.append(chart)
    return charts
