"""Images end to end on the real engine: base image script, default snapshot built through the builder's
Docker Engine API client (podman's compat API, configured by deploy/podman/containers.conf), and a
sandbox-like container started through the same API.

Needs root, podman, runc and debootstrap (scripts/setup-host.sh) and Debian's mirror; the first run
debootstraps the base image (~30 s) and builds the default snapshot cold (~90 s); later runs hit the cache.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from tests.integration.stackthread import StackThread
from tests.polling import wait_until
from tidepool_builder.docker_build import BuildFailedError, build_image, image_exists, inject_ca_bundle
from tidepool_runtime.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO_ROOT / "deploy" / "podman" / "containers.conf"
BUILD_BASE_SCRIPT = REPO_ROOT / "images" / "base" / "build-base.sh"
BASE_IMAGE = "localhost/tidepool/base:bookworm"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
HOST_CA_BUNDLE_IF_PRESENT = HOST_CA_BUNDLE if os.path.exists(HOST_CA_BUNDLE) else None
CA_BUNDLE_IN_SANDBOX = "/etc/ssl/certs/ca-certificates.crt"

needs_podman = pytest.mark.skipif(
    shutil.which("podman") is None or os.geteuid() != 0,
    reason="needs root and podman (scripts/setup-host.sh)",
)


def _podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


class BuildLog:
    """Collects build log lines the way the builder service would stream them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def base_image() -> str:
    started_at = time.monotonic()
    subprocess.run([str(BUILD_BASE_SCRIPT), BASE_IMAGE], env=_podman_env(), check=True, timeout=600)
    print(f"\n[timing] base image ready (build-base.sh) in {time.monotonic() - started_at:.1f}s")
    return BASE_IMAGE


@pytest.fixture(scope="module")
def podman_socket() -> Iterator[Path]:
    """A private `podman system service` on a temporary socket, configured with the repo's containers.conf."""
    socket_dir = Path(tempfile.mkdtemp(prefix="tp-podman-"))
    socket_path = socket_dir / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env=_podman_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: socket_path.exists() or service.poll() is not None,
            "podman system service did not come up",
            timeout=20,
        )
        if service.poll() is not None:
            pytest.fail(f"podman system service exited with {service.poll()}")
        yield socket_path
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
async def docker(podman_socket: Path) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=f"unix://{podman_socket}")
    try:
        yield client
    finally:
        await client.close()


async def _untag(docker: aiodocker.Docker, tag: str) -> None:
    with contextlib.suppress(aiodocker.DockerError):
        await docker.images.delete(tag)


async def _exec(container: Any, command: list[str]) -> tuple[int, str]:
    """Run `command` in a running container through the exec API; return (exit code, stdout+stderr)."""
    execution = await container.exec(command, stdout=True, stderr=True)
    chunks: list[bytes] = []
    async with execution.start(detach=False) as stream:
        while (message := await stream.read_out()) is not None:
            chunks.append(message.data)
    exit_code = (await execution.inspect())["ExitCode"]
    return int(exit_code), b"".join(chunks).decode(errors="replace")


@needs_podman
@pytest.mark.integration
async def test_default_image_builds_and_runs_a_sandbox(stack: StackThread, docker: aiodocker.Docker) -> None:
    """The default snapshot's image, as the stack's builder built it from images/default/Dockerfile (its first
    start waits for that build; building it a second time here cost four minutes of a cold CI run), runs a
    sandbox-like container with everything the image promises."""
    tag = Settings().default_image
    assert await image_exists(docker, tag)
    image = await docker.images.inspect(tag)
    assert image["Config"]["Labels"]["io.tidepool.snapshot"] == "default"
    assert image["Config"]["User"] == "daytona"
    container = await docker.containers.create(
        {
            "Image": tag,
            "Cmd": ["sleep", "infinity"],
            "HostConfig": {
                "Init": True,
                "NanoCpus": 1_000_000_000,
                "Memory": 2 * 1024**3,
                # How the runner injects the configured CA into sandboxes at run time.
                "Binds": [f"{HOST_CA_BUNDLE}:{CA_BUNDLE_IN_SANDBOX}:ro"],
            },
        },
        name=f"tidepool-images-test-{os.getpid()}",
    )
    try:
        await container.start()

        checks: dict[str, list[str]] = {
            "libraries": ["python3", "-c", "import numpy, pandas, matplotlib, requests, flask"],
            "python": ["python", "--version"],
            "git": ["git", "--version"],
            "node": ["node", "--version"],
            "npm": ["npm", "--version"],
            "pylsp": ["pylsp", "--help"],
            "sudo": ["sudo", "-n", "true"],
        }
        for name, command in checks.items():
            exit_code, output = await _exec(container, command)
            assert exit_code == 0, f"{name}: {command} -> {exit_code}: {output}"

        assert (await _exec(container, ["id", "-un"])) == (0, "daytona\n")
        # No WORKDIR: a sandbox's commands start in its user's home (the daemon's rule, tested through
        # the SDK in test_snapshots_sdk), whichever user it has.
        assert not image["Config"].get("WorkingDir")
        assert (await _exec(container, ["sh", "-c", "echo $HOME"])) == (0, "/home/daytona\n")
        _, python_version = await _exec(container, ["python", "--version"])
        assert python_version.startswith("Python 3."), python_version
        _, node_version = await _exec(container, ["node", "--version"])
        assert node_version.startswith("v"), node_version

        exit_code, output = await _exec(container, ["pip", "download", "--quiet", "six", "-d", "/tmp/pip-dl"])
        assert exit_code == 0, output
        # The user can pip install despite PEP 668; as non-root it lands in ~/.local.
        exit_code, output = await _exec(
            container,
            [
                "pip",
                "install",
                "--quiet",
                "--force-reinstall",
                "--no-index",
                "--find-links",
                "/tmp/pip-dl",
                "six",
            ],
        )
        assert exit_code == 0, output
        _, six_location = await _exec(container, ["python", "-c", "import six; print(six.__file__)"])
        assert six_location.startswith("/home/daytona/.local/"), six_location
    finally:
        await container.delete(force=True)


@needs_podman
@pytest.mark.integration
async def test_failing_step_raises_build_failed_with_the_step_in_the_log(
    base_image: str, docker: aiodocker.Docker
) -> None:
    tag = f"localhost/tidepool/failing-test:{os.getpid()}"
    build_log = BuildLog()
    dockerfile = f"FROM {base_image}\nRUN echo before-the-failure\nRUN exit 3\n"
    with pytest.raises(BuildFailedError) as raised:
        await build_image(
            docker, dockerfile=dockerfile, context_files={}, tag=tag, ca_bundle_path=None, on_log=build_log
        )
    assert "RUN exit 3" in raised.value.message
    assert "RUN exit 3" in raised.value.log_tail
    assert "STEP 2/3: RUN echo before-the-failure" in build_log.text
    assert build_log.lines[-1].startswith("ERROR: ")
    assert not await image_exists(docker, tag)


@needs_podman
@pytest.mark.integration
async def test_ca_injection_lets_https_work_during_builds(base_image: str, docker: aiodocker.Docker) -> None:
    tag = f"localhost/tidepool/ca-test:{os.getpid()}"
    dockerfile = (
        f"FROM {base_image}\n"
        # bookworm's pip 23.0 has no --break-system-packages on `download` (PEP 668 only guards installs).
        "RUN apt-get update && apt-get install -y --no-install-recommends python3-pip\n"
        # The nonce keeps this step out of the layer cache, so the download really happens on every run.
        f"RUN pip download -d /tmp/pip-dl six && echo nonce-{time.time_ns()}\n"
    )
    build_log = BuildLog()
    try:
        await build_image(
            docker,
            dockerfile=dockerfile,
            context_files={},
            tag=tag,
            ca_bundle_path=HOST_CA_BUNDLE,
            on_log=build_log,
        )
        assert "Saved /tmp/pip-dl/six-" in build_log.text, build_log.text
    finally:
        await _untag(docker, tag)


@needs_podman
@pytest.mark.integration
async def test_ca_injection_handles_missing_cert_dir_multi_stage_and_platform(
    base_image: str, docker: aiodocker.Docker
) -> None:
    # Kept between runs (like the default image's cache tag): rebuilding it would give it a new id and
    # leave the first stage's layers of every run behind.
    without_certs_tag = "localhost/tidepool/no-certs-test:cache"
    tag = f"localhost/tidepool/multi-stage-test:{os.getpid()}"
    noop_log = BuildLog()
    try:
        await build_image(
            docker,
            dockerfile=f"FROM {base_image}\nRUN rm -rf /etc/ssl\n",
            context_files={},
            tag=without_certs_tag,
            ca_bundle_path=None,
            on_log=noop_log,
        )
        dockerfile = (
            f"FROM {without_certs_tag} AS certless\n"
            "RUN test -s /etc/ssl/certs/ca-certificates.crt\n"
            f"FROM --platform=linux/amd64 {base_image}\n"
            "COPY --from=certless /etc/ssl/certs/ca-certificates.crt /from-stage.crt\n"
            'RUN cmp /from-stage.crt "$SSL_CERT_FILE" && test "$NODE_EXTRA_CA_CERTS" = "$PIP_CERT"\n'
        )
        await build_image(
            docker,
            dockerfile=dockerfile,
            context_files={".dockerignore": b"*\n"},
            tag=tag,
            ca_bundle_path=HOST_CA_BUNDLE,
            on_log=noop_log,
        )
        assert await image_exists(docker, tag)
    finally:
        await _untag(docker, tag)


@needs_podman
@pytest.mark.integration
async def test_image_exists(base_image: str, docker: aiodocker.Docker) -> None:
    assert await image_exists(docker, base_image)
    assert not await image_exists(docker, "localhost/tidepool/does-not-exist:0")


def test_inject_ca_bundle_after_every_from_only() -> None:
    dockerfile = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=debian\n"
        "FROM --platform=$BUILDPLATFORM ${BASE} AS build\n"
        "RUN python3 -c 'import sys; \\\n"
        "from os import path' \\\n"
        "  && true\n"
        "from build\n"
        "FROM \\\n"
        "  scratch AS final\n"
        "RUN <<EOF\n"
        "FROM not-an-instruction\n"
        "EOF\n"
        "COPY --from=build /x /x\n"
    )
    lines = inject_ca_bundle(dockerfile).splitlines()
    copy_line = "COPY tidepool-ca.crt /etc/ssl/certs/ca-certificates.crt"
    assert [index for index, line in enumerate(lines) if line == copy_line] == [3, 10, 15]
    assert lines[2].startswith("FROM --platform")
    # A second copy outside /etc/ssl survives update-ca-certificates in later steps; env vars point there.
    assert lines[4] == "COPY tidepool-ca.crt /usr/local/share/tidepool/ca-bundle.crt"
    assert lines[5].startswith("ENV SSL_CERT_FILE=/usr/local/share/tidepool/ca-bundle.crt ")
    assert lines[9] == "from build"
    assert lines[14] == "  scratch AS final"
    assert "FROM not-an-instruction" in lines and lines[lines.index("FROM not-an-instruction") + 1] == "EOF"


def test_inject_ca_bundle_honours_escape_directive() -> None:
    dockerfile = "# escape=`\nFROM `\n  debian\nRUN echo \\\nFROM x\n"
    lines = inject_ca_bundle(dockerfile).splitlines()
    assert lines[3].startswith("COPY tidepool-ca.crt")
    assert lines[7] == "FROM x"
    assert lines[8].startswith("COPY tidepool-ca.crt")
