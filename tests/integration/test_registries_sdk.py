"""Private registries: credentials stored encrypted and used for pulls (a real registry with auth and TLS)."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from Crypto.Protocol.KDF import bcrypt
from daytona import CreateSandboxFromSnapshotParams, CreateSnapshotParams, Daytona, DaytonaError

from tests.conftest import wait_for_port
from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.stackthread import StackThread

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]
USERNAME, PASSWORD = "tidepool", f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def private_registry(stack: StackThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """docker-registry with htpasswd auth over TLS, using the stack's localhost certificate (trusted CA)."""
    tls = Path(stack.data_dir) / "tls"
    root = tmp_path_factory.mktemp("private-registry")
    (root / "htpasswd").write_bytes(f"{USERNAME}:".encode() + bcrypt(PASSWORD.encode(), 10) + b"\n")
    port = stack.private_registry_port  # the host registry the test stack allows (stackthread.py)
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}', "
        f"tls: {{certificate: {tls / 'server.pem'}, key: {tls / 'server.key'}}}}}\n"
        f"auth: {{htpasswd: {{realm: tidepool, path: {root / 'htpasswd'}}}}}\n"
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


def push_private_image(registry: str) -> str:
    source = ensure_python_slim_stand_in()
    target = f"{registry}/private/app:{uuid.uuid4().hex[:8]}"
    subprocess.run(["podman", "tag", source, target], check=True)
    try:
        subprocess.run(
            ["podman", "push", "--creds", f"{USERNAME}:{PASSWORD}", target], check=True, capture_output=True
        )
    finally:
        # This engine must not have the image locally: the platform has to pull it with the credentials.
        subprocess.run(["podman", "rmi", target], check=False, capture_output=True)
    return target


def test_registries_on_the_platforms_own_host_are_refused(stack: StackThread) -> None:
    """Any spelling of this host (unspecified address, host name, loopback alias, link-local) is refused
    as a registry and as an image source, so no tenant pulls from or probes the host's own ports."""
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    nats_port = stack.stack.env["TIDEPOOL_NATS_URL"].rsplit(":", 1)[1]
    for host in (
        f"0.0.0.0:{nats_port}",
        f"{socket.gethostname()}:{nats_port}",
        "127.1:3000",
        "169.254.169.254",
    ):
        created = httpx.post(
            f"{stack.api_url}/docker-registry",
            json={
                "name": f"r-{uuid.uuid4().hex[:6]}",
                "url": f"https://{host}",
                "username": "u",
                "password": "p",
            },
            headers=headers,
        )
        assert created.status_code == 400, (host, created.text)
        assert "own host" in created.json()["message"]
        snapshot = httpx.post(
            f"{stack.api_url}/snapshots",
            json={"name": f"s-{uuid.uuid4().hex[:6]}", "imageName": f"{host}/x/y:1"},
            headers=headers,
        )
        assert snapshot.status_code == 400, (host, snapshot.text)
        assert "own host" in snapshot.json()["message"]


def test_private_registry_credentials_are_used_for_pulls(stack: StackThread, private_registry: str) -> None:
    daytona = Daytona()
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    image = push_private_image(private_registry)
    with pytest.raises(DaytonaError, match="could not be pulled"):
        daytona.snapshot.create(CreateSnapshotParams(name=f"anon-{uuid.uuid4().hex[:6]}", image=image))

    created = httpx.post(
        f"{stack.api_url}/docker-registry",
        json={
            "name": "private",
            "url": f"https://{private_registry}",
            "username": USERNAME,
            "password": PASSWORD,
        },
        headers=headers,
    )
    assert created.status_code == 201, created.text
    assert "password" not in created.json()
    listed = httpx.get(f"{stack.api_url}/docker-registry", headers=headers).json()
    assert [item["name"] for item in listed] == ["private"] and PASSWORD not in str(listed)
    try:
        name = f"private-{uuid.uuid4().hex[:6]}"
        snapshot = daytona.snapshot.create(CreateSnapshotParams(name=name, image=image))
        assert snapshot.state == "active"
        sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name))
        try:
            assert sandbox.process.exec("python3 -c 'print(1)'").result.strip() == "1"
        finally:
            daytona.delete(sandbox)
    finally:
        registry_id = created.json()["id"]
        assert (
            httpx.delete(f"{stack.api_url}/docker-registry/{registry_id}", headers=headers).status_code == 204
        )
