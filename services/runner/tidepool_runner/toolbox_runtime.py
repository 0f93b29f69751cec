"""The toolbox daemon's own Python runtime (issue #15): staged once on the runner's tmpfs and mounted
read-only into every sandbox, so the daemon runs on any image: glibc or musl, with or without a shell
or python3.

Layout of the staged folder (`RunnerSettings.runtime_dir / "pyrt"`, `/opt/tidepool/runtime` in a sandbox):

    bin/python3                 the runner's own (base) CPython interpreter binary
    lib/ld.so                   that interpreter's dynamic loader (its ELF PT_INTERP: ld-linux-x86-64.so.2)
    lib/*.so*                   every shared library the interpreter and the kept extension modules load,
                                libc included, under their sonames
    lib/pythonX.Y/              the standard library (sources and bytecode; no tests, tkinter, idle, ...)
    lib/pythonX.Y/lib-dynload/  its extension modules

It is started as `lib/ld.so --library-path lib bin/python3 -I ...`: the loader is the one the libraries were
built for, every library comes from `lib/` first, and CPython finds its prefix from `bin/python3`'s place.
Nothing is read from environment variables (`-I`), so nothing is set in the sandbox's environment and
nothing leaks into user processes; programs the daemon starts for users are the image's, run by the image's
own loader. Staged only when the interpreter changes (`.fingerprint`): a runner restart reuses it.
"""

from __future__ import annotations

import compileall
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

RUNTIME_LOADER = "lib/ld.so"
RUNTIME_LIBRARY_DIR = "lib"
RUNTIME_PYTHON = "bin/python3"
FINGERPRINT_FILE = ".fingerprint"
# Standard-library parts the daemon never imports: left out to keep the tmpfs copy small (~40 MB instead of
# several hundred).
STDLIB_SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "distutils",
        "pydoc_data",
        "site-packages",
        "dist-packages",
    }
)
# Extension modules left out: test helpers and those pulling in X11, curses or NIS libraries.
EXTENSION_SKIPPED = re.compile(
    r"^(_test|_xx|xxlimited|_ctypes_test|_tkinter|_curses|readline|nis|spwd|ossaudio)"
)
_PT_INTERP = 3
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)")


def source_interpreter() -> Path:
    """The runner's base interpreter (a venv's `python` is only a symlink to it)."""
    return Path(os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable))


def stage_runtime(target: Path, interpreter: Path | None = None) -> bool:
    """Make `target` hold a runtime built from `interpreter` (default: source_interpreter()). Returns False
    when it already did (same fingerprint), True when it was (re)built.

    The folder is built aside and renamed into place; a replaced one is renamed aside, never emptied, since
    running sandboxes may still have it mounted (the caller removes unused copies). Raises OSError or
    CalledProcessError when the interpreter or its libraries cannot be read.
    """
    interpreter = interpreter or source_interpreter()
    fingerprint = _fingerprint(interpreter)
    try:
        if (target / FINGERPRINT_FILE).read_text() == fingerprint:
            return False
    except OSError:
        pass
    fresh = target.with_name(target.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    _build(fresh, interpreter)
    (fresh / FINGERPRINT_FILE).write_text(fingerprint)
    _make_world_readable(fresh)
    if target.exists():
        target.rename(target.with_name(f"{target.name}.replaced-{time.time_ns()}"))
    fresh.rename(target)
    return True


def _fingerprint(interpreter: Path) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [str(interpreter), str(stdlib), sys.version, str(os.stat(interpreter).st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _build(root: Path, interpreter: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or stdlib / "lib-dynload")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (root / "bin").mkdir(parents=True)
    lib = root / RUNTIME_LIBRARY_DIR
    target_stdlib = lib / version
    shutil.copy2(interpreter, root / RUNTIME_PYTHON)
    shutil.copytree(stdlib, target_stdlib, ignore=_stdlib_ignore, symlinks=False)
    target_dynload = target_stdlib / "lib-dynload"
    target_dynload.mkdir(exist_ok=True)
    extensions = [path for path in dynload.glob("*.so") if not EXTENSION_SKIPPED.match(path.name)]
    for extension in extensions:
        shutil.copy2(extension, target_dynload / extension.name)
    loader = _loader_of(interpreter)
    shutil.copy2(loader, root / RUNTIME_LOADER)
    for soname, path in _shared_libraries(loader, [interpreter, *extensions]).items():
        shutil.copy2(path, lib / soname)
    # Bytecode next to the sources (the copy is read-only inside sandboxes): the interpreter's own compiled
    # files were copied with their sources' mtimes, so only missing ones are compiled here (seconds saved
    # on every runner start on a fresh tmpfs).
    compileall.compile_dir(target_stdlib, quiet=1, workers=1)


def _stdlib_ignore(directory: str, names: list[str]) -> set[str]:
    ignored = {name for name in names if name in STDLIB_SKIPPED_DIRS or name.startswith("config-")}
    if os.path.basename(directory) == "lib-dynload":
        ignored.update(names)  # copied selectively by _build
    ignored.update(name for name in names if name.endswith((".exe", ".a")))
    if os.path.basename(directory) == "__pycache__":
        # This interpreter's unoptimised bytecode only (no other versions, no -O/-OO files).
        ignored.update(name for name in names if not name.endswith(f".{sys.implementation.cache_tag}.pyc"))
    return ignored


def _loader_of(binary: Path) -> Path:
    """The ELF program interpreter (PT_INTERP) `binary` was linked for, resolved to its file. 64-bit
    little-endian ELF only (the platform's hosts); raises OSError otherwise."""
    with open(binary, "rb") as file:
        header = file.read(64)
        if header[:6] != b"\x7fELF\x02\x01":
            raise OSError(f"{binary}: not a 64-bit little-endian ELF file")
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        for index in range(phnum):
            file.seek(phoff + index * phentsize)
            p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack("<IIQQQQ", file.read(40))
            if p_type == _PT_INTERP:
                file.seek(p_offset)
                return Path(os.path.realpath(file.read(p_filesz).rstrip(b"\x00").decode()))
    raise OSError(f"{binary}: no ELF program interpreter (a static binary?)")


def _shared_libraries(loader: Path, binaries: list[Path]) -> dict[str, Path]:
    """soname -> file for every library `binaries` load, as the loader resolves them (`ld.so --list`)."""
    found: dict[str, Path] = {}
    for binary in binaries:
        listing = subprocess.run(
            [str(loader), "--list", str(binary)], capture_output=True, text=True, check=True
        )
        for line in listing.stdout.splitlines():
            match = _LDD_LINE.match(line)
            # The loader itself shows as a path (`/lib64/ld-linux-x86-64.so.2 => ...`): it is lib/ld.so.
            if match and "/" not in match.group(1):
                found.setdefault(match.group(1), Path(os.path.realpath(match.group(2))))
    return found


def _make_world_readable(root: Path) -> None:
    # Inside a user namespace the host's root is `nobody`: only "other" permission bits apply.
    for directory, _dirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            executable = name.endswith(".so") or ".so." in name or path.endswith(("/ld.so", "/python3"))
            os.chmod(path, 0o755 if executable else 0o644)
