"""The staged daemon copy: read-only inside sandboxes, so it carries its own bytecode."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

from tidepool_runner.staging import _stage_daemon

DAEMON_SOURCE = Path(__file__).resolve().parents[3] / "services" / "daemon"


def test_staged_daemon_carries_bytecode_for_this_interpreter(tmp_path: Path) -> None:
    target = tmp_path / "daemon"
    _stage_daemon(DAEMON_SOURCE, target)

    sources = sorted((target / "tidepool_daemon").glob("*.py"))
    assert sources, "the daemon package was not copied"
    for source in sources:
        cached = Path(importlib.util.cache_from_source(str(source)))
        assert cached.is_file(), f"no bytecode for {source.name}"
        # Flags 0b01 = hash-based, check_source bit clear = unchecked: valid whatever the copy's mtimes.
        flags = int.from_bytes(cached.read_bytes()[4:8], "little")
        assert flags == 0b01, f"{cached.name} is not an unchecked-hash pyc (flags {flags:#b})"
        assert cached.stat().st_mode & stat.S_IROTH, "the sandbox sees the host's root as nobody"
    assert not list(target.rglob("tests")), "tests are not part of the staged daemon"

