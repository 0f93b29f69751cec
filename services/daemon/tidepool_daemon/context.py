"""Process-wide facts captured once at start: work dir, home dir and the environment for user commands."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import INVALID_FILE_PATH, DaemonError, bad_request


@dataclass(frozen=True)
class DaemonContext:
    work_dir: str
    home_dir: str
    # The container's environment as the daemon found it; user commands start from this, never from
    # whatever the daemon itself may change later.
    base_env: Mapping[str, str]
    # The image's own entrypoint + cmd, run in the "entrypoint" session (the daemon took its place as PID 1's
    # child). Empty: nothing to run.
    entrypoint: tuple[str, ...] = ()

    @classmethod
    def from_current_process(cls, entrypoint: Sequence[str] = ()) -> DaemonContext:
        return cls(
            work_dir=os.getcwd(),
            home_dir=_home_dir(),
            base_env=_environment_as_started(),
            entrypoint=tuple(entrypoint),
        )

    def resolve_cwd(self, raw_cwd: object) -> str:
        """A request's `cwd`: the work dir when absent, else an existing directory (400 otherwise)."""
        if raw_cwd is None or raw_cwd == "":
            return self.work_dir
        if not isinstance(raw_cwd, str):
            raise bad_request("cwd must be a string")
        cwd = self.resolve_path(raw_cwd)
        if not os.path.isdir(cwd):
            raise bad_request(f"cwd does not exist or is not a directory: {raw_cwd}")
        return cwd

    def resolve_path(self, raw_path: str, *, allow_empty: bool = True) -> str:
        """Absolute, normalised path for `raw_path`; relative paths resolve against the work dir."""
        if raw_path == "" and not allow_empty:
            raise DaemonError(400, "path must not be empty", INVALID_FILE_PATH)
        if "\x00" in raw_path:
            raise DaemonError(400, "path must not contain NUL bytes", INVALID_FILE_PATH)
        try:
            os.fsencode(raw_path)
        except UnicodeError:
            raise DaemonError(
                400, f"path is not valid for this filesystem: {raw_path!r}", INVALID_FILE_PATH
            ) from None
        return os.path.normpath(os.path.join(self.work_dir, raw_path))


def _names_started_with() -> frozenset[bytes] | None:
    """The variable names of the environment this process was exec'd with (/proc/self/environ), None when
    unreadable. Read at import, while still root: once privileges are dropped the process is no longer
    dumpable and its /proc files are root's."""
    try:
        with open("/proc/self/environ", "rb") as initial:
            return frozenset(entry.split(b"=", 1)[0] for entry in initial.read().split(b"\0"))
    except OSError:
        return None


_STARTED_WITH = _names_started_with()


def _environment_as_started() -> dict[str, str]:
    """os.environ without what CPython itself added: with a C locale it sets LC_CTYPE=C.UTF-8 (PEP 538
    locale coercion, which `-I` cannot turn off), and that must not reach user processes (issue #15)."""
    env = dict(os.environ)
    if "LC_CTYPE" in env and _STARTED_WITH is not None and b"LC_CTYPE" not in _STARTED_WITH:
        del env["LC_CTYPE"]
    return env


def _home_dir() -> str:
    home = os.environ.get("HOME")
    if home and os.path.isabs(home):
        return home
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        # Arbitrary uids without a passwd entry still need an absolute answer.
        return "/"
