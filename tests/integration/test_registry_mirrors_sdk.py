"""Registry mirrors (issue #15): with `TIDEPOOL_REGISTRY_MIRRORS=docker.io=http://<mirror>`, snapshots and
declarative builds of Docker Hub images (`docker.io/library/<name>:<tag>` or the short `<name>:<tag>`) are
pulled from the mirror (Docker Hub itself is not reachable here).

The mirror is Debian's docker-registry on loopback (plain http), holding images that exist nowhere else
(a random name pushed only there); the stack is one of its own, configured as `make up` would be with the
variable set. A loopback mirror is on the platform's own host, which tenants may not name as a source:
the operator's mirror serves what it mirrors all the same."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daytona import (
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    Daytona,
    DaytonaConfig,
    DaytonaError,
    Image,
)

from tests.conftest import wait_for_port
from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.stackthread import StackThread, own_stack
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
    with own_stack(
        Path(tmp_path_factory.mktemp("mirrored")),
        wait_for_default_snapshot=False,
        registry_mirrors=f"docker.io=http://{mirror}",
    ) as running:  # every sandbox here comes from the mirror
        yield running


@pytest.fixture
def daytona(mirrored_stack: StackThread) -> Daytona:
    return Daytona(DaytonaConfig(api_key=mirrored_stack.api_key, api_url=mirrored_stack.api_url))


@pytest.fixture
def on_mirror(mirror: str) -> Iterator[str]:
    """`<name>:1`, an image only the mirror has (as `library/<name>:1`); its local copies go afterwards."""
    name = f"mirrored-{uuid.uuid4().hex[:8]}:1"
    on_mirror = f"{mirror}/library/{name}"
    subprocess.run(["podman", "tag", ensure_python_slim_stand_in(), on_mirror], check=True)
    try:
        subprocess.run(["podman", "push", "--tls-verify=false", on_mirror], check=True, capture_output=True)
    finally:
        subprocess.run(["podman", "rmi", on_mirror], check=False, capture_output=True)
    absent = subprocess.run(["podman", "image", "exists", f"docker.io/library/{name}"], check=False)
    assert absent.returncode == 1  # not local: only a pull from the mirror can give it
    yield name
    subprocess.run(["podman", "rmi", f"docker.io/library/{name}"], check=False, capture_output=True)


@pytest.mark.parametrize("form", ["docker.io/library/{}", "{}"])
def test_a_docker_hub_snapshot_is_pulled_from_the_mirror(daytona: Daytona, on_mirror: str, form: str) -> None:
    image = form.format(on_mirror)
    name = f"mirrored-{uuid.uuid4().hex[:6]}"
    snapshot = daytona.snapshot.create(CreateSnapshotParams(name=name, image=image))
    try:
        assert snapshot.state == "active"
        sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name))
        try:
            assert sandbox.process.exec("python3 -c 'print(6 * 7)'").result.strip() == "42"
        finally:
            daytona.delete(sandbox)
    finally:
        daytona.snapshot.delete(snapshot)


def test_a_declarative_image_builds_from_the_mirror(daytona: Daytona, on_mirror: str) -> None:
    image = Image.base(on_mirror).run_commands("echo built-on-mirrored-base > /opt/marker")
    sandbox = daytona.create(CreateSandboxFromImageParams(image=image), timeout=600)
    try:
        assert sandbox.process.exec("cat /opt/marker").result.strip() == "built-on-mirrored-base"
    finally:
        daytona.delete(sandbox)


def test_a_docker_hub_image_the_mirror_lacks_fails_naming_the_mirror(daytona: Daytona, mirror: str) -> None:
    missing = f"docker.io/library/absent-{uuid.uuid4().hex[:8]}:1"
    name = f"absent-{uuid.uuid4().hex[:6]}"
    with pytest.raises(DaytonaError) as failure:
        daytona.snapshot.create(CreateSnapshotParams(name=name, image=missing))
    assert mirror in str(failure.value)


def test_tenants_still_may_not_name_the_loopback_mirror_itself(daytona: Daytona, mirror: str) -> None:
    with pytest.raises(DaytonaError, match="platform's own host"):
        daytona.snapshot.create(CreateSnapshotParams(name="direct", image=f"{mirror}/library/anything:1"))
