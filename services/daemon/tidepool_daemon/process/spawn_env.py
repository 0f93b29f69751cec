"""The environment for processes the code/git/LSP endpoints spawn on the user's behalf.

It starts from the sandbox's effective environment (the container's, plus whatever `POST /env` set, when
`../environment.py` provides `effective_environment()`), then adds per-request `envs`, validated exactly like
`/process/execute` does.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..context import DaemonContext
from ..errors import bad_request


def base_environment(context: DaemonContext) -> dict[str, str]:
    try:
        from ..environment import effective_environment
    except ImportError:
        return dict(context.base_env)
    return dict(effective_environment(context))


def build_environment(context: DaemonContext, raw_envs: object = None) -> dict[str, str]:
    env = base_environment(context)
    env.update(parse_envs(raw_envs))
    return env


def parse_envs(raw_envs: object) -> dict[str, str]:
    if raw_envs is None:
        return {}
    if not isinstance(raw_envs, Mapping):
        raise bad_request("envs must be an object of string values")
    parsed: dict[str, str] = {}
    for name, value in raw_envs.items():
        if not isinstance(value, str):
            raise bad_request(f"envs.{name} must be a string")
        if not isinstance(name, str) or not name or "=" in name or "\x00" in name or "\x00" in value:
            raise bad_request(f"invalid environment variable name or value: {name!r}")
        parsed[name] = value
    return parsed
