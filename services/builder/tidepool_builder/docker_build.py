"""Image builds through the Docker Engine API (`POST /build`), as served by Docker or podman's compat API.

Podman 4.3 compat `/build` facts this module relies on (measured):
- the body must be sent with `Content-Type: application/x-tar` (other types make it look for the
  Dockerfile in an empty context); plain or gzip'd tar both work;
- query parameters follow Docker's: `t`, `dockerfile`, `rm`, `forcerm`, `nocache`, `pull`, `buildargs`;
  `pull=1` means *always* pull, so it is never set (the base images are local, there is no registry);
- progress arrives as JSON lines `{"stream": "..."}`; a failure is an in-band
  `{"errorDetail": {"message": ...}, "error": ...}` line with HTTP 200; success ends with
  `{"aux": {"ID": "sha256:..."}}` and "Successfully built/tagged" stream lines.
"""

import asyncio
import io
import re
import tarfile
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

import aiodocker

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

_PARSER_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*$")
_HEREDOC_START = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")

LogCallback = Callable[[str], Awaitable[None]]


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
    escape_char = _escape_directive(lines)
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
                (match.group(3), match.group(1) == "-") for match in _HEREDOC_START.finditer(line)
            )
        if current_is_from and not in_continuation:
            output.extend(injected)

    trailing_newline = "\n" if dockerfile.endswith("\n") or not dockerfile else ""
    return "\n".join(output) + trailing_newline


def _escape_directive(lines: Iterable[str]) -> str:
    """The `# escape=` parser directive (only valid before the first instruction/comment), default `\\`."""
    for line in lines:
        match = _PARSER_DIRECTIVE.match(line.strip())
        if not match:
            break
        if match.group(1).lower() == "escape" and match.group(2) in ("\\", "`"):
            return match.group(2)
    return "\\"


def build_context_tar(dockerfile: str, context_files: Mapping[str, bytes], ca_bundle: bytes | None) -> bytes:
    """An uncompressed tar of the build context (the engine is local: compressing would only cost CPU)."""
    files: dict[str, bytes] = {name.lstrip("/"): content for name, content in context_files.items()}
    # Our Dockerfile text is authoritative over any context file of the same name.
    files[DOCKERFILE_CONTEXT_NAME] = dockerfile.encode()
    if ca_bundle is not None:
        files[CA_BUNDLE_CONTEXT_NAME] = ca_bundle
        if ".dockerignore" in files:
            # A user's `*` / `*.crt` ignore rule must not hide the injected bundle from COPY.
            unignore_ca_bundle = f"\n!{CA_BUNDLE_CONTEXT_NAME}\n".encode()
            files[".dockerignore"] = files[".dockerignore"].rstrip(b"\n") + unignore_ca_bundle

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
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
) -> str:
    """Build `dockerfile` with `context_files` as the context, tag it `tag`, and return the image id.

    Each build log line is passed to `on_log` as it arrives. When `ca_bundle_path` is given, that bundle
    is added to the context and installed after every FROM, so https works in RUN steps behind a
    TLS-intercepting proxy (and stays trusted in the resulting image). An `organization_id` is labelled
    right after every FROM, which keeps the engine's layer cache per organization (organization_lines).
    Raises BuildFailedError on a failing step or an engine error.
    """
    ca_bundle = await asyncio.to_thread(Path(ca_bundle_path).read_bytes) if ca_bundle_path else None
    injected = organization_lines(organization_id) if organization_id else ()
    if ca_bundle is not None:
        injected += CA_INJECTION_LINES
    if injected:
        dockerfile = inject_after_from(dockerfile, injected)
    # Contexts can be large (user files): keep tarring off the event loop.
    context_tar = await asyncio.to_thread(build_context_tar, dockerfile, context_files, ca_bundle)
    log_lines = _LogLineSplitter(on_log)

    try:
        async for chunk in docker.images.build(
            fileobj=io.BytesIO(context_tar),
            encoding="identity",
            path_dockerfile=DOCKERFILE_CONTEXT_NAME,
            tag=tag,
            rm=True,
            forcerm=True,  # no leftover build containers after a failed step
            stream=True,
        ):
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
