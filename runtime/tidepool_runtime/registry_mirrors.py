"""Registry mirrors (`TIDEPOOL_REGISTRY_MIRRORS`): the operator maps a registry (e.g. `docker.io`) to
mirrors that serve its images, so builds and pulls work behind a firewall without that registry.

The mechanism is a rewrite of the reference before it reaches the engine: `python:3.12-slim` is
normalised the Docker way (`docker.io/library/python:3.12-slim`), pulled as
`<mirror>/library/python:3.12-slim` from each mirror in turn, then from the registry itself, and the image
is tagged locally with its normalised name, so builds (`FROM python:3.12-slim`) and containers find it
there. This works on any engine that speaks the Docker API (Podman, Docker, a remote one) and needs no host
configuration beyond plain http for a mirror that does not speak TLS (which the engine must allow:
`make up` does so for the mirrors it is given, see tidepool_stack.supervisor.registries_conf).

Only anonymous pulls go through a mirror: a pull with an organization's registry credentials goes to the
registry those credentials belong to, so a tenant's password never reaches the operator's mirror.

A mirror is reached only by this rewrite, so a mirror on the platform's own host (e.g. a loopback
registry) serves the images it mirrors without being opened to tenants as an image source of its own
(tidepool_runtime.image_refs.check_registry_host still refuses it when named directly).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from tidepool_runtime.image_refs import LOOPBACK_HOSTS, ImageReference, registry_host

_HOST = re.compile(r"^(?:[a-z0-9.-]+|\[[0-9a-f:]+\])(?::[0-9]+)?$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
EXAMPLE = "docker.io=http://127.0.0.1:5001,ghcr.io=https://mirror.example/ghcr"


@dataclass(frozen=True)
class Mirror:
    """One mirror: `host[:port]` plus an optional path prefix (e.g. a Harbor proxy-cache project)."""

    host: str
    prefix: str = ""
    plain_http: bool = False
    """Plain http (an `http://` mirror, or a loopback one given without scheme); else TLS."""

    @property
    def location(self) -> str:
        """`host[:port][/prefix]`: what a reference's repository path is appended to."""
        return f"{self.host}/{self.prefix}" if self.prefix else self.host

    def __str__(self) -> str:
        return f"{'http' if self.plain_http else 'https'}://{self.location}"


def _host_name(host: str) -> str:
    return host[1 : host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]


def parse_mirror(text: str) -> Mirror:
    """`[http://|https://]host[:port][/path]` → Mirror; ValueError when it is not one."""
    raw = text.strip()
    scheme, separator, rest = raw.partition("://")
    if not separator:
        scheme, rest = "", raw
    elif scheme.lower() not in ("http", "https"):
        raise ValueError(f"registry mirror {text!r}: only http:// or https:// mirrors")
    host, _, prefix = rest.rstrip("/").partition("/")
    host = host.lower()
    if not _HOST.match(host) or not all(_PATH_COMPONENT.match(part) for part in prefix.split("/") if prefix):
        raise ValueError(f"registry mirror {text!r} is not [http(s)://]host[:port][/path]")
    name = _host_name(host)
    loopback = name in {"localhost", "::1"} or name.startswith("127.") or host in LOOPBACK_HOSTS
    plain = scheme.lower() == "http" or (not scheme and loopback)
    return Mirror(host=host, prefix=prefix, plain_http=plain)


def parse_registry_mirrors(value: str | Mapping[str, str | Sequence[str]]) -> dict[str, list[Mirror]]:
    """The operator's setting → {registry: [mirrors in order]}.

    Either `REGISTRY=MIRROR[,REGISTRY=MIRROR…]` (a registry may repeat: its mirrors in order) or a JSON object
    `{"docker.io": "http://127.0.0.1:5001"}` / `{"docker.io": ["m1", "m2"]}`. Registries are folded the
    Docker way (`index.docker.io` is `docker.io`). ValueError naming the entry that is not one.
    """
    pairs: list[tuple[str, str]] = []
    if isinstance(value, str) and value.strip().startswith("{"):
        value = json.loads(value)  # JSONDecodeError is a ValueError
        if not isinstance(value, dict):
            raise ValueError(f"registry mirrors: a JSON object is expected (e.g. {EXAMPLE})")
    if isinstance(value, str):
        for entry in value.replace(" ", ",").split(","):
            if not entry:
                continue
            source, separator, mirror = entry.partition("=")
            if not separator or not source or not mirror:
                raise ValueError(f"registry mirror {entry!r} is not REGISTRY=MIRROR (e.g. {EXAMPLE})")
            pairs.append((source, mirror))
    else:
        for source, mirrors in value.items():
            pairs += [(source, mirrors)] if isinstance(mirrors, str) else [(source, m) for m in mirrors]
    parsed: dict[str, list[Mirror]] = {}
    for source, mirror in pairs:
        registry = registry_host(source.strip())
        if not _HOST.match(registry) or "/" in source:
            raise ValueError(f"registry mirror {source}={mirror}: {source!r} is not a registry host")
        parsed.setdefault(registry, []).append(parse_mirror(mirror))
    return parsed


def format_registry_mirrors(mirrors: Mapping[str, Sequence[Mirror]]) -> str:
    """The setting's `REGISTRY=MIRROR,…` form (what parse_registry_mirrors reads back)."""
    return ",".join(f"{source}={mirror}" for source, entries in mirrors.items() for mirror in entries)


def mirrored_references(reference: ImageReference, mirrors: Mapping[str, Sequence[Mirror]]) -> list[str]:
    """Where the mirrors of `reference`'s registry serve it, in order (empty: that registry has none).

    `python:3.12-slim` → `<mirror>/library/python:3.12-slim` for a mirror of docker.io; the tag and digest
    are kept."""
    registry = reference.registry
    repository = reference.repository.removeprefix(f"{registry}/")
    suffix = f":{reference.tag}" if reference.tag else ""
    suffix += f"@{reference.digest}" if reference.digest else ""
    return [f"{mirror.location}/{repository}{suffix}" for mirror in mirrors.get(registry, ())]


def local_tag(reference: ImageReference) -> str | None:
    """The tag a pulled image gets under `reference`'s own name: its tag, `latest` when it names neither a
    tag nor a digest (as the engine reads it), None for a digest alone (a digest is not a tag)."""
    if reference.tag:
        return reference.tag
    return None if reference.digest else "latest"


class PullFailedError(Exception):
    """Neither a mirror nor the registry itself served the image; the message names every attempt."""


async def pull_through_mirrors(
    reference: ImageReference,
    mirrors: Mapping[str, Sequence[Mirror]],
    pull: Callable[[str], Awaitable[None]],
) -> str:
    """Pull `reference` from its registry's mirrors in order, then from the registry itself; return the
    reference that was pulled (a mirror's, or `reference.canonical`). `pull` raises on failure."""
    failures: list[str] = []
    for candidate in [*mirrored_references(reference, mirrors), reference.canonical]:
        try:
            await pull(candidate)
        except Exception as error:  # an engine error of any kind: try the next source
            failures.append(f"{candidate}: {getattr(error, 'message', None) or error}")
            continue
        return candidate
    raise PullFailedError("; ".join(failures))
