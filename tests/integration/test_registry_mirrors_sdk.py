"""Registry mirrors (issue #15): with `TIDEPOOL_REGISTRY_MIRRORS=docker.io=<mirror>`, a snapshot of a
`docker.io/library/...` image is pulled from the mirror (Docker Hub itself is not reachable here).

The mirror is Debian's docker-registry on loopback (plain http), holding an image that exists nowhere else;
the stack is one of its own, configured as `make up` would be with the variable set."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daytona import CreateSandboxFromSnapshotParams, CreateSnapshotParams, Daytona, DaytonaConfig

from tests.conftest import wait_for_port
from tests.integration.conftest import drop_postgres_database, fresh_postgres_database
from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.stackthread import StackThread
from tidepool_stack.supervisor import free_port

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
    argv = ["docker-registry", "serve", str(root / "config.yml")]
    process = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def mirrored_stack(tmp_path_factory: pytest.TempPathFactory, mirror: str) -> Iterator[StackThread]:
    base_url = os.environ.get("TIDEPOOL_DATABASE_URL", "")
    database_url, database_name = fresh_postgres_database(base_url) if base_url else ("", "")
    running = StackThread(
        Path(tmp_path_factory.mktemp("mirrored")),
        database_url=database_url,
        registry_mirrors={"docker.io": [mirror]},
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()
        if database_name:
            drop_postgres_database(base_url, database_name)


def put_on_mirror(mirror: str) -> str:
    """An image only the mirror has, and the `docker.io/library/...` name a user would give for it."""
    name = f"mirrored-{uuid.uuid4().hex[:8]}:1"
    on_mirror = f"{mirror}/library/{name}"
    subprocess.run(["podman", "tag", ensure_python_slim_stand_in(), on_mirror], check=True)
    try:
        subprocess.run(["podman", "push", "--tls-verify=false", on_mirror], check=True, capture_output=True)
    finally:
        subprocess.run(["podman", "rmi", on_mirror], check=False, capture_output=True)
    return f"docker.io/library/{name}"


def test_a_docker_hub_reference_is_pulled_from_the_mirror(mirrored_stack: StackThread, mirror: str) -> None:
    daytona = Daytona(DaytonaConfig(api_key=mirrored_stack.api_key, api_url=mirrored_stack.api_url))
    image = put_on_mirror(mirror)
    name = f"mirrored-{uuid.uuid4().hex[:6]}"
    snapshot = daytona.snapshot.create(CreateSnapshotParams(name=name, image=image))
    assert snapshot.state == "active"
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name))
    try:
        assert sandbox.process.exec("python3 -c 'print(6 * 7)'").result.strip() == "42"
    finally:
        daytona.delete(sandbox)
