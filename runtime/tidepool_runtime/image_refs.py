"""Image references: which images belong to whom, and which an organization may build from or run.

Every image the platform makes for an organization carries that organization in its local name:
- `localhost/tidepool/build/{org}:{digest}`: a Dockerfile build; the digest covers the organization, the
  Dockerfile and the context hashes, so two organizations never share a cached build;
- `localhost/tidepool/snapshot/{org}:{snapshot_id}`: a snapshot registered from an image reference.
The platform's own images (`localhost/tidepool/default:*`, `localhost/tidepool/base:*`) are for everyone.

A user-given reference (a snapshot's `imageName`, a Dockerfile's FROM / `--from=`) may name a public or
private registry image, the platform's images, or its own organization's images. It may not name another
organization's local image (answered as not found, whether it exists or not), nor the platform's internal
registry (which only the builder and the runners can log in to), nor any registry on the platform's own
host (a loopback, unspecified, link-local or local address, however it is spelt or named): pulls run in
the host's network, where a tenant could otherwise reach, or probe, the platform's own ports.

Podman resolves short names against local images by path suffix (`base:bookworm` finds
`localhost/tidepool/base:bookworm`), so short names that could reach another organization's namespace are
refused as well.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LOCAL_HOST = "localhost"
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
PLATFORM_NAMESPACE = "tidepool"
BUILD_KIND = "build"
SNAPSHOT_KIND = "snapshot"
ORG_KINDS = (BUILD_KIND, SNAPSHOT_KIND)

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class ReferenceRefusedError(Exception):
    """A reference the organization may not use; `status` is the HTTP status to answer with (400 or 404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageReference:
    """A parsed `[host[:port]/]path[:tag][@digest]`; `host` is None for a Docker Hub short name."""

    host: str | None
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def registry(self) -> str:
        return self.host or DOCKER_HUB

    @property
    def repository(self) -> str:
        """The fully qualified repository, as the engine names it (`docker.io/library/python`)."""
        path = self.path
        if self.registry == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        return f"{self.registry}/{path}"

    @property
    def canonical(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    """Parse an image reference; ValueError when it is not one."""
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ValueError(f"invalid digest in image reference {text!r}")
    first, slash, remainder = rest.partition("/")
    host: str | None = None
    if slash and ("." in first or ":" in first or first == LOCAL_HOST):
        if not _HOST.match(first):
            raise ValueError(f"invalid registry host in image reference {text!r}")
        host = first.lower()
        host = DOCKER_HUB if host in DOCKER_HUB_ALIASES else host
        rest = remainder
    path, tag = rest, None
    last_colon = rest.rfind(":")
    if last_colon > rest.rfind("/"):
        path, tag = rest[:last_colon], rest[last_colon + 1 :]
        if not _TAG.match(tag):
            raise ValueError(f"invalid tag in image reference {text!r}")
    if not path or not all(_COMPONENT.match(part) for part in path.split("/")):
        raise ValueError(f"invalid repository name in image reference {text!r}")
    return ImageReference(host=host, path=path, tag=tag, digest=digest or None)


def _org_component(organization_id: str) -> str:
    """The organization as a repository path component (organization ids are UUIDs; others are hashed)."""
    if _COMPONENT.match(organization_id):
        return organization_id
    return "o" + hashlib.sha256(organization_id.encode()).hexdigest()[:32]


def build_ref(organization_id: str, dockerfile: str, context_hashes: Sequence[str]) -> str:
    """The organization's image for this Dockerfile and context: the declarative build cache key."""
    material = "\0".join([organization_id, dockerfile, *context_hashes])
    digest = hashlib.sha256(material.encode()).hexdigest()[:48]
    return f"{LOCAL_HOST}/{PLATFORM_NAMESPACE}/{BUILD_KIND}/{_org_component(organization_id)}:{digest}"


def snapshot_ref(organization_id: str, snapshot_id: str) -> str:
    """The local name of a snapshot registered from an image reference (one per snapshot)."""
    repository = f"{LOCAL_HOST}/{PLATFORM_NAMESPACE}/{SNAPSHOT_KIND}/{_org_component(organization_id)}"
    return f"{repository}:{snapshot_id}"


def local_owner(reference: ImageReference) -> str | None:
    """The organization component of a platform-made local image (`localhost/tidepool/{kind}/{org}`)."""
    if reference.host != LOCAL_HOST:
        return None
    parts = reference.path.split("/")
    if len(parts) == 3 and parts[0] == PLATFORM_NAMESPACE and parts[1] in ORG_KINDS:
        return parts[2]
    return None


def _short_name_reaches_another(reference: ImageReference, own: str) -> bool:
    """Whether a short name could resolve, by path suffix, to a platform-made image of another organization:
    `{org}:...`, `build/{org}:...`, `tidepool/build/{org}:...`, or the shared `localhost/tidepool/build`
    repository of earlier versions (`build:...`, `tidepool/build:...`)."""
    if reference.host is not None:
        return False
    parts = reference.path.split("/")
    for kind in ORG_KINDS:
        namespace = [PLATFORM_NAMESPACE, kind]
        if len(parts) <= 2 and parts == namespace[2 - len(parts) :]:
            return True
        prefix = parts[:-1]
        if len(prefix) <= 2 and prefix == namespace[2 - len(prefix) :] and _UUID.match(parts[-1]):
            return parts[-1] != own
    return False


def registry_host(url: str) -> str:
    """`host[:port]` of a registry given as a URL or bare host, lowercased, Docker Hub aliases folded."""
    host = url.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def same_registry(host: str, registry_url: str) -> bool:
    """Whether `host` names the registry at `registry_url` (loopback aliases with the same port included)."""
    if not registry_url:
        return False
    target = registry_host(registry_url)
    if host == target:
        return True
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    target_name, _, target_port = target.rpartition(":") if not target.endswith("]") else (target, "", "")
    return bool(port) and port == target_port and name in LOOPBACK_HOSTS and target_name in LOOPBACK_HOSTS


def _host_name(host: str) -> str:
    """`host[:port]` → the name or address alone (brackets of an IPv6 literal removed)."""
    if host.startswith("["):
        return host[1 : host.index("]")] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


def _address_is_host_local(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
        return True
    # An address this machine can bind is one of its own (any interface, bridge or alias).
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


@functools.lru_cache(maxsize=512)
def registry_is_host_local(host: str) -> bool:
    """Whether a registry `host[:port]` is this machine: a loopback, unspecified, link-local or local
    address, or a name resolving to one (`0.0.0.0`, `[::]`, the host name, `127.1`, a DNS name pointing to
    127.0.0.1). A name that does not resolve here is not local (its pull fails on its own). Cached: the
    answer concerns this host's addresses, which do not move under a running service."""
    name = _host_name(host)
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return any(_address_is_host_local(str(info[4][0])) for info in infos)


def check_registry_host(host: str, allowed_host_registries: Iterable[str], *, what: str) -> None:
    """ReferenceRefusedError (400) when `host[:port]` is a registry on the platform's own host, unless the
    operator listed it (`TIDEPOOL_ALLOWED_HOST_REGISTRIES`)."""
    host = host.lower()
    if host in {allowed.lower() for allowed in allowed_host_registries}:
        return
    if registry_is_host_local(host):
        raise ReferenceRefusedError(
            400, f"{what} is in a registry on the platform's own host ({host}): use a remote registry"
        )


def internal_registry_auth(
    image: str, registry_url: str, username: str, password: str
) -> dict[str, str] | None:
    """X-Registry-Auth fields for an image in the platform's internal registry, else None."""
    if not (registry_url and username):
        return None
    try:
        reference = parse_reference(image)
    except ValueError:
        return None
    if reference.host is None or not same_registry(reference.host, registry_url):
        return None
    return {"username": username, "password": password, "serveraddress": reference.host}


def platform_repositories(images: Iterable[str]) -> frozenset[str]:
    """The repositories of the platform's own images (any tag of them may be used by every organization)."""
    return frozenset(parse_reference(image).repository for image in images if image)


def check_reference(
    text: str,
    organization_id: str,
    *,
    internal_registry: str,
    platform_images: Iterable[str],
    allowed_host_registries: Iterable[str] = (),
) -> ImageReference:
    """The parsed reference if `organization_id` may use it, else ReferenceRefusedError (400 or 404).

    Another organization's local image is "not found" (404) whether it exists or not, so that nothing can
    be learnt about other tenants; a malformed reference or the internal registry is a 400.
    """
    try:
        reference = parse_reference(text)
    except ValueError as error:
        raise ReferenceRefusedError(400, f"Invalid image name {text}: {error}") from error
    if reference.host is not None and same_registry(reference.host, internal_registry):
        raise ReferenceRefusedError(
            400,
            f"Image {text} is in the platform's internal registry, which only runners use: "
            "create the snapshot from the image's own name or from a Dockerfile",
        )
    own = _org_component(organization_id)
    if reference.repository in platform_repositories(platform_images):
        return reference
    if reference.host not in (None, LOCAL_HOST):
        check_registry_host(reference.host, allowed_host_registries, what=f"Image {text}")
    if reference.host == LOCAL_HOST:
        if local_owner(reference) != own:
            raise ReferenceRefusedError(404, f"Image {text} not found")
        return reference
    if _short_name_reaches_another(reference, own):
        raise ReferenceRefusedError(404, f"Image {text} not found")
    return reference


# -- Dockerfiles: the images a build reads (FROM, COPY/ADD --from=, RUN --mount=...,from=) ---------------

_PARSER_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*$")
HEREDOC_START = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def dockerfile_escape_character(lines: Iterable[str]) -> str:
    """The `# escape=` parser directive (valid only before the first instruction or comment), default `\\`."""
    for line in lines:
        match = _PARSER_DIRECTIVE.match(line.strip())
        if not match:
            break
        if match.group(1).lower() == "escape" and match.group(2) in ("\\", "`"):
            return match.group(2)
    return "\\"


def dockerfile_instructions(dockerfile: str) -> list[str]:
    """The instructions of a Dockerfile, continuation lines joined, comments and heredoc bodies left out."""
    lines = dockerfile.splitlines()
    escape = dockerfile_escape_character(lines)
    instructions: list[str] = []
    current: list[str] = []
    heredocs: list[tuple[str, bool]] = []
    for line in lines:
        if heredocs:
            terminator, strip_tabs = heredocs[0]
            if (line.lstrip("\t") if strip_tabs else line) == terminator:
                heredocs.pop(0)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continued instruction, where the parser drops them
        continued = stripped.endswith(escape)
        current.append(stripped[:-1] if continued else stripped)
        if continued:
            continue
        instruction = " ".join(current)
        current = []
        instructions.append(instruction)
        if instruction.split(maxsplit=1)[0].upper() != "FROM":
            heredocs.extend((m.group(3), m.group(1) == "-") for m in HEREDOC_START.finditer(instruction))
    if current:
        instructions.append(" ".join(current))
    return instructions


def _unquote(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "\"'":
        return word[1:-1]
    return word


def _substitute(word: str, arguments: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        operator, alternative = match.group(2), match.group(3)
        value = arguments.get(name)
        if operator and operator.endswith("-"):
            return value if value else _unquote(alternative or "")
        if operator and operator.endswith("+"):
            return _unquote(alternative or "") if value else ""
        if value is None:
            raise ValueError(f"build argument ${name} has no default value")
        return value

    return _VARIABLE.sub(replace, word)


def _arguments(words: Sequence[str], into: dict[str, str]) -> None:
    for word in words:
        name, equals, default = word.partition("=")
        if equals:
            into[name] = _unquote(default)
        else:
            into.setdefault(name, "")


def dockerfile_image_references(dockerfile: str) -> list[str]:
    """Every image a build of `dockerfile` reads, with global ARG defaults substituted (stages excluded).

    ValueError when a reference cannot be known before the build (a build argument without a default).
    """
    arguments: dict[str, str] = {}
    stages: set[str] = set()
    references: list[str] = []
    seen_from = False

    def add(word: str, what: str) -> None:
        try:
            value = _substitute(_unquote(word), arguments)
        except ValueError as error:
            raise ValueError(f"{what} {word}: {error}") from error
        if not value:
            raise ValueError(f"{what} {word} is empty")
        if value.lower() in stages or value.isdigit() or value.lower() == "scratch":
            return
        references.append(value)

    for instruction in dockerfile_instructions(dockerfile):
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        words = rest.split()
        if keyword == "ARG" and not seen_from:
            _arguments(words, arguments)
        elif keyword == "FROM":
            seen_from = True
            plain = [word for word in words if not word.startswith("--")]
            if not plain:
                raise ValueError(f"FROM without an image: {instruction}")
            add(plain[0], "FROM")
            if len(plain) >= 3 and plain[1].upper() == "AS":
                stages.add(plain[2].lower())
        elif keyword in ("COPY", "ADD"):
            for word in words:
                if word.startswith("--from="):
                    add(word.removeprefix("--from="), f"{keyword} --from")
        elif keyword == "RUN":
            for word in words:
                if not word.startswith("--mount="):
                    continue
                for option in word.removeprefix("--mount=").split(","):
                    key, _, value = option.partition("=")
                    if key == "from":
                        add(value, "RUN --mount from")
    return references
