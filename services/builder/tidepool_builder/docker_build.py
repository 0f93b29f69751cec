"""Image builds through podman's build API (`POST /libpod/build`); tenant RUN steps confined like sandboxes.

Podman 4.3 `/build` facts this module relies on (measured; `/libpod/build` is the same handler):
- the body must be sent with `Content-Type: application/x-tar` (other types make it look for the
  Dockerfile in an empty context); plain or gzip'd tar both work;
- query parameters follow Docker's: `t`, `dockerfile`, `rm`, `forcerm`, `nocache`, `pull`, `buildargs`;
  `pull=1` means *always* pull, so it is never set (the base images are local, there is no registry);
- the libpod parameters express what Docker's API cannot (see BuildIsolation.query): `nsoptions` (without
  it RUN steps share the HOST's network namespace), `idmappingoptions` (the user namespace), `addcaps` /
  `dropcaps`, `memory`/`memswap`, `cpuperiod`/`cpuquota`, `ulimits`; `layers` defaults to false on the
  libpod path (the layer cache), so it is always sent;
- progress arrives as JSON lines `{"stream": "..."}`; a failure is an in-band
  `{"errorDetail": {"message": ...}, "error": ...}` line with HTTP 200; success ends with
  "Successfully built/tagged" stream lines.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import tarfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiodocker
from aiodocker.jsonstream import json_stream_stream

from tidepool_runtime.image_refs import HEREDOC_START, dockerfile_escape_character
from tidepool_runtime.isolation import (
    SANDBOX_CAPABILITIES,
    SandboxNetworkError,
    auto_userns_size,
    check_network,
    network_config,
)
from tidepool_runtime.settings import BuilderSettings as Settings

CA_BUNDLE_CONTEXT_NAME = "tidepool-ca.crt"
CA_BUNDLE_IMAGE_PATH = "/etc/ssl/certs/ca-certificates.crt"
DOCKERFILE_CONTEXT_NAME = "Dockerfile"
LOG_TAIL_LINES = 40
MAX_LOG_LINE_CHARS = 16 * 1024  # longer output lines reach on_log in pieces of this size

# A copy outside /etc/ssl survives `update-ca-certificates` (run by apt when a step installs packages, which
# rewrites the system bundle); every common TLS client (OpenSSL, requests, pip, Node, curl, git) reads it.
CA_BUNDLE_STABLE_PATH = "/usr/local/share/tidepool/ca-bundle.crt"
CA_INJECTION_LINES = (
    f"COPY {CA_BUNDLE_CONTEXT_NAME} {CA_BUNDLE_IMAGE_PATH}",
    f"COPY {CA_BUNDLE_CONTEXT_NAME} {CA_BUNDLE_STABLE_PATH}",
    f"ENV SSL_CERT_FILE={CA_BUNDLE_STABLE_PATH} REQUESTS_CA_BUNDLE={CA_BUNDLE_STABLE_PATH} "
    f"PIP_CERT={CA_BUNDLE_STABLE_PATH} NODE_EXTRA_CA_CERTS={CA_BUNDLE_STABLE_PATH} "
    f"CURL_CA_BUNDLE={CA_BUNDLE_STABLE_PATH} GIT_SSL_CAINFO={CA_BUNDLE_STABLE_PATH}",
)


LogCallback = Callable[[str], Awaitable[None]]

CPU_PERIOD_MICROSECONDS = 100_000
GIB = 1024**3


@dataclass(frozen=True)
class BuildIsolation:
    """How a build's RUN steps are confined: as a sandbox is (issue #7), since they run tenant code.

    - `network`: the engine network they join, the sandbox network behind the runner's host firewall (no
      host, control plane, other sandboxes, private or metadata addresses; DNS and the internet allowed).
      Without it podman runs RUN steps in the HOST's network namespace;
    - `capabilities`: all others dropped (the sandboxes' set: no MKNOD, NET_RAW, SYS_ADMIN, ...), under the
      engine's default seccomp profile;
    - `cpu` (cores) and `memory_bytes` (swap included): cgroup limits of every step;
    - `pids`, `nofile`: RLIMIT_NPROC / RLIMIT_NOFILE of every step. The kernel exempts uid 0 from
      RLIMIT_NPROC and podman's build API has no pids limit: the build's own cgroup bounds its processes
      (build_cgroup);
    - `userns_size`: a private user namespace per build (podman's `--userns=auto:size=N`), root in a step
      being an unprivileged host uid range of its own (`TIDEPOOL_BUILD_USERNS`). The stack sets it together
      with the build engine it starts for the builder: podman 4.3.1 on a store that idmaps overlay layers
      (this host's kernel) commits such builds with host-range owners, so they need that engine's store and
      runtime (tidepool_stack.build_runtime; see the README's Isolation section).
    """

    network: str
    cpu: float
    memory_bytes: int
    pids: int
    nofile: int
    capabilities: tuple[str, ...] = SANDBOX_CAPABILITIES
    dns_servers: tuple[str, ...] = ()
    userns_size: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> BuildIsolation:
        """Raises ValueError when `build_userns` is set but not an `auto` mode (a private range per build)."""
        return cls(
            network=settings.sandbox_network,
            cpu=settings.build_cpu,
            memory_bytes=int(settings.build_memory_gib * GIB),
            pids=settings.build_pids,
            nofile=settings.container_nofile,
            dns_servers=tuple(settings.sandbox_dns_servers),
            userns_size=auto_userns_size(settings.build_userns) if settings.build_userns else None,
        )

    def query(self) -> dict[str, str]:
        """`/libpod/build` query parameters (JSON-valued ones as podman's own client encodes them)."""
        # A name (not an absolute path) is a network to join.
        namespaces: list[dict[str, object]] = [{"Name": "network", "Host": False, "Path": self.network}]
        params = {
            "networkmode": "NetworkEnabled",
            "dropcaps": json.dumps(["ALL"]),
            "addcaps": json.dumps([f"CAP_{name}" for name in self.capabilities]),
            "memory": str(self.memory_bytes),
            "memswap": str(self.memory_bytes),
            "cpuperiod": str(CPU_PERIOD_MICROSECONDS),
            "cpuquota": str(max(1000, int(self.cpu * CPU_PERIOD_MICROSECONDS))),
            "ulimits": json.dumps([f"nproc={self.pids}:{self.pids}", f"nofile={self.nofile}:{self.nofile}"]),
        }
        if self.userns_size is not None:
            namespaces.append({"Name": "user", "Host": False, "Path": ""})
            id_mappings = {
                "HostUIDMapping": False,
                "HostGIDMapping": False,
                "AutoUserNs": True,
                "AutoUserNsOpts": {"Size": self.userns_size},
            }
            params["idmappingoptions"] = json.dumps(id_mappings)
        params["nsoptions"] = json.dumps(namespaces)
        if self.dns_servers:
            params["dnsservers"] = json.dumps(list(self.dns_servers))
        return params


class BuildFailedError(Exception):
    """The engine rejected the build or a build step failed; `log_tail` holds the last log lines."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail

    def __str__(self) -> str:
        return self.message


ORGANIZATION_LABEL = "io.tidepool.organization"


def organization_lines(organization_id: str) -> tuple[str, ...]:
    """A LABEL step naming the organization, first after every FROM: every later step's layer-cache key
    includes it, so builds of two organizations never share a cached layer (e.g. a `RUN` that generated a
    key), even for identical Dockerfiles and context."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", organization_id)  # ids are UUIDs; never Dockerfile syntax
    return (f'LABEL {ORGANIZATION_LABEL}="{safe}"',)


def inject_ca_bundle(dockerfile: str) -> str:
    """Return `dockerfile` with the CA bundle COPY + ENV lines inserted after every FROM instruction."""
    return inject_after_from(dockerfile, CA_INJECTION_LINES)


def inject_after_from(dockerfile: str, injected: Iterable[str]) -> str:
    """Return `dockerfile` with `injected` lines inserted after every FROM instruction.

    A line scanner rather than a regex over the text, so that `FROM` inside continuation lines or heredoc
    bodies (e.g. `RUN python -c "...\\` / `from x import y`) is not mistaken for an instruction, and
    multi-line FROMs (`FROM --platform=$BUILDPLATFORM \\` / `image AS builder`) get the lines after
    their last line. COPY creates missing parent directories, so images without /etc/ssl/certs work.
    """
    injected = tuple(injected)
    lines = dockerfile.splitlines()
    escape_char = dockerfile_escape_character(lines)
    output: list[str] = []
    in_continuation = False
    current_is_from = False
    pending_heredoc_terminators: deque[tuple[str, bool]] = deque()

    for line in lines:
        output.append(line)
        if pending_heredoc_terminators:
            terminator, strip_tabs = pending_heredoc_terminators[0]
            if (line.lstrip("\t") if strip_tabs else line) == terminator:
                pending_heredoc_terminators.popleft()
            continue
        stripped = line.strip()
        if in_continuation:
            # Comment and blank lines inside a continued instruction are dropped by the parser.
            if not stripped or stripped.startswith("#"):
                continue
        else:
            if not stripped or stripped.startswith("#"):
                continue
            current_is_from = stripped.split(maxsplit=1)[0].upper() == "FROM"
        in_continuation = stripped.endswith(escape_char)
        if not current_is_from:
            pending_heredoc_terminators.extend(
                (match.group(3), match.group(1) == "-") for match in HEREDOC_START.finditer(line)
            )
        if current_is_from and not in_continuation:
            output.extend(injected)

    trailing_newline = "\n" if dockerfile.endswith("\n") or not dockerfile else ""
    return "\n".join(output) + trailing_newline


def build_context_tar(
    dockerfile: str,
    context_files: Mapping[str, bytes],
    ca_bundle: bytes | None,
    context_modes: Mapping[str, int] | None = None,
) -> bytes:
    """An uncompressed tar of the build context (the engine is local: compressing would only cost CPU).
    `context_modes` (path -> permission bits) gives the files' modes, which COPY keeps as Docker does; a
    file without one (and every file the builder adds) is 0644."""
    modes = {name.lstrip("/"): mode for name, mode in (context_modes or {}).items()}
    files: dict[str, bytes] = {name.lstrip("/"): content for name, content in context_files.items()}
    # Our Dockerfile text is authoritative over any context file of the same name.
    files[DOCKERFILE_CONTEXT_NAME] = dockerfile.encode()
    modes.pop(DOCKERFILE_CONTEXT_NAME, None)
    if ca_bundle is not None:
        files[CA_BUNDLE_CONTEXT_NAME] = ca_bundle
        modes.pop(CA_BUNDLE_CONTEXT_NAME, None)
        if ".dockerignore" in files:
            # A user's `*` / `*.crt` ignore rule must not hide the injected bundle from COPY.
            unignore_ca_bundle = f"\n!{CA_BUNDLE_CONTEXT_NAME}\n".encode()
            files[".dockerignore"] = files[".dockerignore"].rstrip(b"\n") + unignore_ca_bundle

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = modes.get(name, 0o644) & 0o777
            info.mtime = 0  # constant mtimes keep COPY layers cacheable across rebuilds
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class _LogLineSplitter:
    """Turns the engine's `stream` chunks (not necessarily whole lines) into lines for `on_log`."""

    def __init__(self, on_log: LogCallback) -> None:
        self._on_log = on_log
        self._partial = ""
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)

    async def feed(self, text: str) -> None:
        self._partial += text
        *complete_lines, self._partial = self._partial.split("\n")
        for line in complete_lines:
            for start in range(0, max(len(line), 1), MAX_LOG_LINE_CHARS):
                await self.emit(line[start : start + MAX_LOG_LINE_CHARS])
        # Output without newlines (progress bars, binary junk) must not grow without bound.
        while len(self._partial) > MAX_LOG_LINE_CHARS:
            await self.emit(self._partial[:MAX_LOG_LINE_CHARS])
            self._partial = self._partial[MAX_LOG_LINE_CHARS:]

    async def flush(self) -> None:
        if self._partial:
            line, self._partial = self._partial, ""
            await self.emit(line)

    async def emit(self, line: str) -> None:
        line = line.rstrip("\r")
        self.tail.append(line)
        await self._on_log(line)

    def tail_text(self) -> str:
        return "\n".join(self.tail)


async def build_image(
    docker: aiodocker.Docker,
    *,
    dockerfile: str,
    context_files: dict[str, bytes],
    tag: str,
    ca_bundle_path: str | None,
    on_log: LogCallback,
    organization_id: str | None = None,
    isolation: BuildIsolation | None = None,
    cgroup_parent: str | None = None,
    context_modes: Mapping[str, int] | None = None,
) -> str:
    """Build `dockerfile` with `context_files` as the context, tag it `tag`, and return the image id.

    Each build log line is passed to `on_log` as it arrives. When `ca_bundle_path` is given, that bundle
    is added to the context and installed after every FROM, so https works in RUN steps behind a
    TLS-intercepting proxy (and stays trusted in the resulting image). An `organization_id` is labelled
    right after every FROM, which keeps the engine's layer cache per organization (organization_lines).
    `isolation` confines the RUN steps (the builder always gives it; None = the engine's defaults, i.e.
    host root in the host's network: only for the platform's own Dockerfiles in tests). `cgroup_parent` is
    the cgroup path every RUN step runs in (build_cgroup.BuildCgroup.step_path: bounds its processes).
    `context_modes` (path -> permission bits) are the context files' modes, kept by COPY (0644 without).
    Raises BuildFailedError on a failing step or an engine error.
    """
    ca_bundle = await asyncio.to_thread(Path(ca_bundle_path).read_bytes) if ca_bundle_path else None
    injected = organization_lines(organization_id) if organization_id else ()
    if ca_bundle is not None:
        injected += CA_INJECTION_LINES
    if injected:
        dockerfile = inject_after_from(dockerfile, injected)
    # Contexts can be large (user files): keep tarring off the event loop.
    context_tar = await asyncio.to_thread(
        build_context_tar, dockerfile, context_files, ca_bundle, context_modes
    )
    log_lines = _LogLineSplitter(on_log)
    params = {
        "t": tag,
        "dockerfile": DOCKERFILE_CONTEXT_NAME,
        "layers": "true",  # the layer cache (off by default on the libpod path)
        "rm": "true",
        "forcerm": "true",  # no leftover build containers after a failed step
        **(isolation.query() if isolation else {}),
    }
    if cgroup_parent:
        params["cgroupparent"] = cgroup_parent

    try:
        response_context = docker._query(
            "libpod/build",
            "POST",
            params=params,
            headers={"Content-Type": "application/x-tar", "Content-Encoding": "identity"},
            data=context_tar,
            timeout=docker._resolve_long_running_timeout(None),  # builds take as long as they take
        )
        async with response_context as response:
            async for chunk in json_stream_stream(response):
                if "stream" in chunk:
                    await log_lines.feed(str(chunk["stream"]))
    except aiodocker.DockerError as error:
        # DockerStreamError (in-band errorDetail line, HTTP 200) or a non-2xx answer from the engine.
        message = str(error.message).strip() or f"engine answered HTTP {error.status}"
        await log_lines.flush()
        await log_lines.emit(f"ERROR: {message}")
        raise BuildFailedError(message, log_lines.tail_text()) from error
    await log_lines.flush()

    # The final `aux.ID` line is not sent by every engine/version; the tag is authoritative anyway.
    try:
        image = await docker.images.inspect(tag)
    except aiodocker.DockerError as error:
        message = f"build finished but {tag} is not in the image store: {error.message}"
        raise BuildFailedError(message, log_lines.tail_text()) from error
    return str(image["Id"])


async def image_exists(docker: aiodocker.Docker, tag: str) -> bool:
    """Whether `tag` (name:tag or id) is in the engine's local image store."""
    try:
        await docker.images.inspect(tag)
    except aiodocker.DockerError as error:
        if error.status == 404:
            return False
        raise
    return True


NETWORK_POLL_SECONDS = 1.0


async def wait_for_sandbox_network(
    docker: aiodocker.Docker, settings: Settings, poll_seconds: float = NETWORK_POLL_SECONDS
) -> None:
    """Return once the sandbox network exists on the engine as `settings` describe it.

    The builder never creates it: a runner on the engine's host does, together with the host firewall that
    makes it safe (tidepool_runner.network); a network without that firewall would let RUN steps reach the
    host. Waits up to `build_network_wait_seconds` (a runner starting alongside the builder), then raises
    SandboxNetworkError saying what to do; raises it at once for a network on the wrong bridge or subnet.
    """
    name = settings.sandbox_network
    network_config(settings)  # validates the settings (SandboxNetworkError)
    deadline = time.monotonic() + settings.build_network_wait_seconds
    while True:
        try:
            inspect = await (await docker.networks.get(name)).show()
            break
        except aiodocker.DockerError as error:
            if error.status != 404:
                raise
        if time.monotonic() > deadline:
            raise SandboxNetworkError(
                f"the sandbox network {name!r} does not exist on this engine, and build steps run only on it "
                "(behind the firewall that keeps them from the host and the control plane): start a runner "
                "on the engine's host, which creates the network and its firewall"
            )
        await asyncio.sleep(poll_seconds)
    check_network(inspect, settings)
