"""The daemon's own runtime (issue #15): a relocatable copy of this interpreter that runs with nothing but
its own folder: its own loader and libraries, no environment variables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tidepool_runner.container_config import DAEMON_ENTRYPOINT, RUNTIME_MOUNT_PATH
from tidepool_runner.toolbox_runtime import stage_runtime

PROBE = (
    "import json, os, sys, ssl, ctypes, sqlite3, zlib, pwd;"
    "print(json.dumps([sys.executable, sys.prefix, sys.version, sys.path, dict(os.environ)]))"
)


def test_staged_runtime_runs_on_its_own_loader_and_libraries(tmp_path: Path) -> None:
    root = tmp_path / "pyrt"
    assert stage_runtime(root) is True
    assert stage_runtime(root) is False  # same interpreter: kept as it is
    # Moved elsewhere, as a mount moves it: nothing in it names the host's paths.
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    lib = moved / "lib"
    argv = [str(lib / "ld.so"), "--library-path", str(lib), str(moved / "bin" / "python3")]
    completed = subprocess.run([*argv, "-I", "-c", PROBE], env={}, capture_output=True, text=True, check=True)
    executable, prefix, version, path, env = json.loads(completed.stdout)
    assert executable == str(moved / "bin" / "python3")
    assert prefix == str(moved)
    assert version == sys.version
    assert all(entry.startswith(str(moved)) for entry in path), path
    # Only what CPython's locale coercion may add (the daemon drops it, see the daemon's context.py).
    assert set(env) <= {"LC_CTYPE"}, env
    assert not list(moved.rglob("test_*.py")), "the standard library's tests are left out"


def test_the_daemon_entrypoint_uses_the_runtime_not_the_image() -> None:
    assert DAEMON_ENTRYPOINT[:4] == [
        f"{RUNTIME_MOUNT_PATH}/lib/ld.so",
        "--library-path",
        f"{RUNTIME_MOUNT_PATH}/lib",
        f"{RUNTIME_MOUNT_PATH}/bin/python3",
    ]
