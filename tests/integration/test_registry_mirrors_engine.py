"""Registry mirrors on the real engine (issue #15), without a whole stack: a Podman API service configured
as `make up` configures it (the stack's registries.conf for the mirror), Debian's docker-registry on
loopback as the mirror of docker.io, and the builder's and the runner's own pull code. The SDK path is
tests/integration/test_registry_mirrors_sdk.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest

from tests.conftest import wait_for_port
from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.polling import wait_until
from tidepool_builder.docker_build import build_image
from tidepool_builder.images import ImageUnusableError, ensure_build_sources, ensure_source_image
from tidepool_runner.engine import ContainerEngine
from tidepool_runtime.registry_mirrors import parse_registry_mirrors
from tidepool_stack.supervisor import CONTAINERS_CONF, Stack, StackConfig, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mirror")
    port = free_port()
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    process = subprocess.Popen(
        ["docker-registry", "serve", str(root / "config.yml")], stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def setting(mirror: str) -> str:
    return f"docker.io=http://{mirror}"


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory, setting: str) -> Iterator[str]:
    """A Podman API service whose registries.conf is the one the stack writes for this setting."""
    data_dir = Path(tmp_path_factory.mktemp("engine"))
    registries_conf = Stack(StackConfig(data_dir=data_dir, registry_mirrors=setting)).registries_conf("")
    socket_path = data_dir / "podman.sock"
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(CONTAINERS_CONF),
        "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
    }
    argv = ["podman", "system", "service", "--time=0", f"unix://{socket_path}"]
    process = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(socket_path.exists, timeout=30)
        yield f"unix://{socket_path}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
async def docker(engine_url: str) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=engine_url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def on_mirror(mirror: str) -> Iterator[str]:
    """`<name>:1`, an image only the mirror has (as `library/<name>:1`); every local name of it goes after."""
    name = f"mirrored-{uuid.uuid4().hex[:8]}:1"
    pushed = f"{mirror}/library/{name}"
    subprocess.run(["podman", "tag", ensure_python_slim_stand_in(), pushed], check=True)
    try:
        subprocess.run(["podman", "push", "--tls-verify=false", pushed], check=True, capture_output=True)
    finally:
        subprocess.run(["podman", "rmi", pushed], check=False, capture_output=True)
    assert not exists(f"docker.io/library/{name}")
    yield name
    for local in (
        f"docker.io/library/{name}",
        pushed,
        f"localhost/tidepool/mirror-test:{name.split(':')[0]}",
    ):
        subprocess.run(["podman", "rmi", local], check=False, capture_output=True)


def exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], check=False).returncode == 0


async def test_a_snapshot_source_comes_from_the_mirror_under_its_docker_hub_name(
    docker: aiodocker.Docker, on_mirror: str, setting: str, mirror: str
) -> None:
    snapshot = f"localhost/tidepool/mirror-test:{on_mirror.split(':')[0]}"
    await ensure_source_image(docker, on_mirror, snapshot, mirrors=parse_registry_mirrors(setting))
    assert exists(snapshot)
    assert exists(f"docker.io/library/{on_mirror}")
    assert not exists(f"{mirror}/library/{on_mirror}")  # the mirror's name is not left behind


async def test_a_dockerfile_from_is_pulled_through_the_mirror_before_the_build(
    docker: aiodocker.Docker, on_mirror: str, setting: str
) -> None:
    dockerfile = f"FROM {on_mirror}\nLABEL io.tidepool.mirror-test=1\n"
    await ensure_build_sources(docker, [on_mirror], parse_registry_mirrors(setting))
    tag = f"localhost/tidepool/mirror-test:{on_mirror.split(':')[0]}"
    lines: list[str] = []

    async def log(line: str) -> None:
        lines.append(line)

    await build_image(
        docker, dockerfile=dockerfile, context_files={}, tag=tag, ca_bundle_path=None, on_log=log
    )
    assert exists(tag)


async def test_an_image_no_mirror_serves_fails_naming_what_was_tried(
    docker: aiodocker.Docker, setting: str, mirror: str
) -> None:
    missing = f"absent-{uuid.uuid4().hex[:8]}:1"
    with pytest.raises(ImageUnusableError) as failure:
        await ensure_build_sources(docker, [missing], parse_registry_mirrors(setting))
    assert f"{mirror}/library/{missing}" in str(failure.value)
    assert f"docker.io/library/{missing}" in str(failure.value)


async def test_the_runner_pulls_a_docker_hub_image_from_the_mirror(
    docker: aiodocker.Docker, on_mirror: str, setting: str, mirror: str
) -> None:
    engine = ContainerEngine(docker, mirrors=parse_registry_mirrors(setting))
    await engine.ensure_image(f"docker.io/library/{on_mirror}")
    assert exists(f"docker.io/library/{on_mirror}")
    assert not exists(f"{mirror}/library/{on_mirror}")
    with contextlib.suppress(aiodocker.DockerError):
        await docker.images.delete(f"docker.io/library/{on_mirror}")
