"""The staged daemon copy: read-only inside sandboxes, so it carries its own bytecode."""

from __future__ import annotations

import importlib.util
import stat
import subprocess
from pathlib import Path

from tidepool_runner.staging import _stage_daemon

DAEMON_SOURCE = Path(__file__).resolve().parents[3] / "services" / "daemon"


def test_staged_daemon_carries_bytecode_for_this_interpreter(tmp_path: Path) -> None:
    target = tmp_path / "daemon"
    _stage_daemon(DAEMON_SOURCE, target)

    sources = sorted((target / "tidepool_daemon").rglob("*.py"))
    assert sources, "the daemon package was not copied"
    for source in sources:
        cached = Path(importlib.util.cache_from_source(str(source)))
        assert cached.is_file(), f"no bytecode for {source.name}"
        # Flags 0b01 = hash-based, check_source bit clear = unchecked: valid whatever the copy's mtimes.
        flags = int.from_bytes(cached.read_bytes()[4:8], "little")
        assert flags == 0b01, f"{cached.name} is not an unchecked-hash pyc (flags {flags:#b})"
        assert cached.stat().st_mode & stat.S_IROTH, "the sandbox sees the host's root as nobody"
    assert not list(target.rglob("tests")), "tests are not part of the staged daemon"


def test_a_mounted_copy_survives_restaging_and_is_removed_once_unused(tmp_path: Path) -> None:
    source, target, mounted = tmp_path / "src", tmp_path / "runtime" / "daemon", tmp_path / "sandbox-view"
    source.mkdir()
    (source / "main.py").write_text("print('v1')\n")
    target.parent.mkdir()
    mounted.mkdir()
    _stage_daemon(source, target)
    # A sandbox's bind mount of the staged copy, as the runner makes it.
    subprocess.run(["mount", "--bind", str(target), str(mounted)], check=True)
    try:
        (source / "main.py").write_text("print('v2')\n")
        _stage_daemon(source, target)  # a runner restart
        assert (target / "main.py").read_text() == "print('v2')\n"
        # The running sandbox's supervisor still finds its daemon to start new workers from.
        assert (mounted / "main.py").read_text() == "print('v1')\n"
        assert len(list(target.parent.glob("daemon.replaced-*"))) == 1
    finally:
        subprocess.run(["umount", str(mounted)], check=True)
    _stage_daemon(source, target)  # no mount uses the old copies any more
    assert list(target.parent.glob("daemon.replaced-*")) == []
    assert (target / "main.py").read_text() == "print('v2')\n"
