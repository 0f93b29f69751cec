"""The environment user processes start with, plus `POST /env` and `POST /init`.

`POST /env` changes what every process spawned afterwards (exec, code-run, sessions, PTYs) inherits; running
processes keep theirs, like upstream. The changes are kept as overrides on top of the environment the
daemon started with (never written into `os.environ`, which other threads read concurrently), so call
`effective_environment()` whenever a user process is about to be started.

The overrides live for the daemon process's lifetime; a sandbox restart starts from the container env again
(upstream mutates its own process env, with the same lifetime).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .errors import bad_request
from .httpd.http_io import Request, Response, json_response


class HasBaseEnv(Protocol):
    @property
    def base_env(self) -> Mapping[str, str]: ...


_lock = threading.Lock()
# The environment the daemon serves requests with, captured on first use (after start-up has settled it,
# e.g. HOME/USER once privileges were dropped), never re-read: later os.environ changes don't leak in.
_start_env: dict[str, str] | None = None
_set_overrides: dict[str, str] = {}
_unset_overrides: set[str] = set()


def effective_environment(base: Mapping[str, str] | HasBaseEnv | None = None) -> dict[str, str]:
    """A fresh dict: `base` with every `POST /env` applied. `base` is a mapping, or anything with a
    `base_env` mapping (a DaemonContext); by default the daemon's start-up environment.

    Callers may mutate the result (e.g. add per-command envs on top)."""
    if base is None:
        start: Mapping[str, str] = _start_environment()
    elif isinstance(base, Mapping):
        start = base
    else:
        start = base.base_env
    env = dict(start)
    with _lock:
        for name in _unset_overrides:
            env.pop(name, None)
        env.update(_set_overrides)
    return env


def update_environment(
    set_vars: Mapping[str, str] | None = None,
    unset: Iterable[str] = (),
    unset_value_prefix: str = "",
) -> dict[str, str | None]:
    """Apply one update, in upstream's order: the value-prefix unset, then `unset`, then `set`.

    Returns the effective changes: name -> new value, or None for a removed variable. Variables whose value
    did not change are left out."""
    set_vars = dict(set_vars or {})
    with _lock:
        before = _current_locked()
        removals = set(unset)
        if unset_value_prefix:
            removals.update(
                name
                for name, value in before.items()
                if value.startswith(unset_value_prefix) and name not in set_vars
            )
        for name in removals:
            _set_overrides.pop(name, None)
            _unset_overrides.add(name)
        for name, value in set_vars.items():
            _unset_overrides.discard(name)
            _set_overrides[name] = value
        after = _current_locked()
    changes: dict[str, str | None] = {}
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name):
            changes[name] = after.get(name)
    return changes


def reset_environment() -> None:
    """Forget every override (tests; a fresh daemon starts like this)."""
    with _lock:
        _set_overrides.clear()
        _unset_overrides.clear()


def _start_environment() -> dict[str, str]:
    with _lock:
        return _start_locked()


def _start_locked() -> dict[str, str]:
    global _start_env
    if _start_env is None:
        _start_env = dict(os.environ)
    return _start_env


def _current_locked() -> dict[str, str]:
    env = dict(_start_locked())
    for name in _unset_overrides:
        env.pop(name, None)
    env.update(_set_overrides)
    return env


def _validate_name(name: Any, field: str) -> str:
    if not isinstance(name, str) or not name or "=" in name or "\x00" in name:
        raise bad_request(f"{field}: invalid environment variable name {name!r}")
    return name


class EnvironmentService:
    def update_env(self, request: Request) -> Response:
        payload = request.json_object_body(optional=True)
        raw_set = payload.get("set")
        raw_unset = payload.get("unset")
        prefix = payload.get("unsetValuePrefix")
        raw_set = {} if raw_set is None else raw_set
        raw_unset = [] if raw_unset is None else raw_unset
        prefix = "" if prefix is None else prefix
        if not isinstance(raw_set, dict):
            raise bad_request("'set' must be an object of string values")
        set_vars: dict[str, str] = {}
        for name, value in raw_set.items():
            _validate_name(name, "set")
            if not isinstance(value, str) or "\x00" in value:
                raise bad_request(f"set.{name} must be a string without NUL bytes")
            set_vars[name] = value
        if not isinstance(raw_unset, list):
            raise bad_request("'unset' must be a list of names")
        unset = [_validate_name(name, "unset") for name in raw_unset]
        if not isinstance(prefix, str):
            raise bad_request("'unsetValuePrefix' must be a string")
        return json_response(200, update_environment(set_vars, unset, prefix))

    def initialize(self, request: Request) -> Response:
        payload = request.json_object_body(optional=True)
        token = payload.get("token")
        if token is not None and not isinstance(token, str):
            raise bad_request("'token' must be a string")
        # Upstream stores the token for its telemetry exporter; Tidepool's daemon has none, so the call
        # only has to succeed.
        return json_response(200, {})
