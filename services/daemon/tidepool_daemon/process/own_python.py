"""How the daemon starts its own interpreter again, and what it needs of the image (issue #15).

The daemon runs on the runtime the runner stages read-only at /opt/tidepool/runtime (see the runner's
toolbox_runtime.py): `lib/ld.so --library-path lib bin/python3`. Its `bin/python3` started directly would use
the image's dynamic loader and libraries (or fail on a musl or static image), so helper processes (session
and PTY shells' helpers, bounded jobs) are started through `own_python()`. No environment variable is
involved, so user processes inherit nothing of the runtime.
"""

from __future__ import annotations

import os
import sys

from ..errors import DaemonError

RUNTIME_LOADER = os.path.join("lib", "ld.so")
RUNTIME_LIBRARY_DIR = "lib"


def own_python() -> list[str]:
    """argv prefix running the daemon's interpreter: through the staged runtime's loader when the daemon
    runs from one, else `sys.executable` (a daemon started by hand or in unit tests)."""
    root = os.path.dirname(os.path.dirname(sys.executable))
    loader = os.path.join(root, RUNTIME_LOADER)
    if os.path.isfile(loader):
        return [loader, "--library-path", os.path.join(root, RUNTIME_LIBRARY_DIR), sys.executable]
    return [sys.executable]


# Prepended to helper code: CPython's locale coercion (PEP 538) sets LC_CTYPE=C.UTF-8 in a helper started
# with a C locale, and the helper execs the user's shell with that environment. Drop it unless the helper
# was given it (its environment as exec'd: /proc/self/environ; the helper runs as the user, so readable).
_DROP_COERCED_LOCALE = (
    "import os\n"
    "try:\n"
    "    with open('/proc/self/environ', 'rb') as _f:\n"
    "        _given = {_e.split(b'=', 1)[0] for _e in _f.read().split(b'\\0')}\n"
    "    if b'LC_CTYPE' not in _given:\n"
    "        os.environ.pop('LC_CTYPE', None)\n"
    "except OSError:\n"
    "    pass\n"
)


def own_python_helper(code: str, *args: str) -> list[str]:
    """argv running `code` (a `-c` helper that execs a user program) on the daemon's interpreter, leaving
    the user program's environment exactly as the helper was given it."""
    return [*own_python(), "-I", "-S", "-c", _DROP_COERCED_LOCALE + code, *args]


def missing_shell(shell: str, feature: str) -> str | None:
    """None when `shell` exists, else the message naming it: `"<feature> needs a shell, but this sandbox's
    image has no <shell> (nor /bin/bash)"` (distroless-style images)."""
    if os.path.exists(shell):
        return None
    return f"{feature} needs a shell, but this sandbox's image has no {shell} (nor /bin/bash)"


def require_shell(shell: str, feature: str) -> None:
    """Raise DaemonError 400 with missing_shell()'s message when the image has no `shell`."""
    message = missing_shell(shell, feature)
    if message is not None:
        raise DaemonError(400, message)
