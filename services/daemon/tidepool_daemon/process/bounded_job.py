"""One bounded job, in its own process (see bounded.py for why and for the parent's side).

Protocol: the request `{"kind", "params", "limits": {"cpu_seconds", "memory_bytes"}}` arrives as JSON on
stdin; the job writes its response body (JSON) to stdout. Exit status 0 means success; otherwise see the
`EXIT_*` statuses in bounded.py (a DaemonError goes to stderr as one JSON object line).

The limits are set here, first thing, rather than in the parent between fork and exec, because the parent
is multi-threaded (no Python code may run between its fork and exec). Every request pays for this process's
start, so it imports only what the jobs need (no HTTP machinery, no subprocess handling).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, BinaryIO

from ..errors import DaemonError

# Exit statuses (anything else is a crash).
EXIT_OK = 0
EXIT_DAEMON_ERROR = 3  # a DaemonError, as one JSON object on stderr
EXIT_OUT_OF_MEMORY = 4
EXIT_STOPPED = 5  # SIGXCPU (CPU bound) or SIGTERM (wall-clock bound) reached the job, which cleaned up
_OUTPUT_BUFFER_BYTES = 64 * 1024


class JobStopped(BaseException):
    """The CPU bound (SIGXCPU) or the wall-clock bound (SIGTERM) was reached; `finally` blocks clean up."""


def _jobs() -> dict[str, Callable[[dict[str, Any], BinaryIO], None]]:
    from ..fs.files import list_job
    from ..fs.search import find_job, replace_job, search_job

    return {"find": find_job, "search": search_job, "replace": replace_job, "list": list_job}


def _stop(signum: int, frame: FrameType | None) -> None:
    raise JobStopped(signal.Signals(signum).name)


def _apply_limits(limits: dict[str, Any]) -> None:
    cpu = int(limits["cpu_seconds"])
    # Soft: SIGXCPU, which the job turns into JobStopped; hard, a second later: SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = int(limits["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def main() -> None:
    signal.signal(signal.SIGXCPU, _stop)
    signal.signal(signal.SIGTERM, _stop)
    out = open(sys.stdout.fileno(), "wb", buffering=_OUTPUT_BUFFER_BYTES, closefd=False)  # noqa: SIM115
    try:
        request = json.loads(sys.stdin.buffer.read().decode("utf-8", "surrogatepass"))
        _apply_limits(request["limits"])
        job = _jobs()[request["kind"]]
        job(request["params"], out)
        out.flush()
    except DaemonError as error:
        _clean_up()
        payload = {"status": error.status, "message": error.message, "code": error.code}
        sys.stderr.write(json.dumps(payload) + "\n")
        sys.stderr.flush()
        os._exit(EXIT_DAEMON_ERROR)
    except MemoryError:
        _clean_up()
        os._exit(EXIT_OUT_OF_MEMORY)
    except JobStopped:
        _clean_up()
        os._exit(EXIT_STOPPED)
    os._exit(EXIT_OK)


def _clean_up() -> None:
    """Undo what a job left half-done, with further stop signals held back so the cleanup completes."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGXCPU})
    from ..fs.search import remove_temp_files

    remove_temp_files()
