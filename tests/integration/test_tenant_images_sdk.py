"""Two tenant organizations attack each other's builds and images the way issue #7 item 5 found them,
through the official SDK and the REST API, on a whole stack (real object storage, builder, registry,
runner on Podman)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import urllib3
from daytona import (
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    Daytona,
    DaytonaConfig,
    DaytonaError,
    Image,
)
from daytona._sync.object_storage import ObjectStorage
from minio import Minio

from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.stackthread import StackThread
from tests.polling import wait_until
from tidepool_builder.images import registry_reference

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]
SETTLED = {"active", "error", "build_failed"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Tenant:
    def __init__(self, stack: StackThread, organization_id: str, key: str) -> None:
        self.stack = stack
        self.organization_id = organization_id
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}
        self.daytona = Daytona(DaytonaConfig(api_key=key, api_url=stack.api_url))

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.stack.api_url}{path}", headers=self.headers, timeout=30)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.stack.api_url}{path}", json=body, headers=self.headers, timeout=30)

    def settled_snapshot(self, snapshot_id: str, timeout: float = 900) -> dict[str, Any]:
        def settled() -> dict[str, Any] | None:
            body: dict[str, Any] = self.get(f"/snapshots/{snapshot_id}").json()
            return body if body["state"] in SETTLED else None

        return wait_until(settled, f"snapshot {snapshot_id} never settled", timeout=timeout, interval=0.5)


def new_tenant(stack: StackThread, name: str) -> Tenant:
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": name},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    return Tenant(stack, created.json()["id"], created.json()["apiKey"]["value"])


@pytest.fixture(scope="module")
def tenants(stack: StackThread) -> Iterator[tuple[Tenant, Tenant]]:
    pair = new_tenant(stack, unique("tenant-a")), new_tenant(stack, unique("tenant-b"))
    yield pair
    # The engine's image store is shared: remove exactly the names these tenants' snapshots added
    # (a name shared with another image, e.g. a registered public image, only loses this tag).
    registry = stack.stack.env.get("TIDEPOOL_REGISTRY_URL", "")
    for tenant in pair:
        for item in tenant.get("/snapshots").json()["items"]:
            ref = item.get("ref") or ""
            if item["general"] or f"/{tenant.organization_id}:" not in ref:
                continue
            names = [ref, ":".join(registry_reference(registry, ref))] if registry else [ref]
            for name in names:
                subprocess.run(["podman", "rmi", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def python_slim() -> str:
    return ensure_python_slim_stand_in()


def read_in_sandbox(tenant: Tenant, snapshot: str, path: str) -> bytes:
    sandbox = tenant.daytona.create(CreateSandboxFromSnapshotParams(snapshot=snapshot), timeout=300)
    try:
        return sandbox.fs.download_file(path)
    finally:
        tenant.daytona.delete(sandbox)


def upload_as(tenant: Tenant, context_hash: str, archive_path: str, content: bytes) -> None:
    """What an attacker does with its own push-access keys: any bytes, under a hash of its choosing."""
    access = tenant.get("/object-storage/push-access").json()
    http_client = urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED", ca_certs=tenant.stack.stack.object_storage_ca
    )
    client = Minio(
        access["storageUrl"].split("://", 1)[1],
        access_key=access["accessKey"],
        secret_key=access["secret"],
        session_token=access["sessionToken"],
        secure=True,
        region=access["region"],
        http_client=http_client,
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(archive_path)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    key = f"{access['organizationId']}/{context_hash}/context.tar"
    client.put_object(access["bucket"], key, io.BytesIO(buffer.getvalue()), len(buffer.getvalue()))


def test_bytes_uploaded_under_another_tenants_hash_never_reach_its_image(
    tenants: tuple[Tenant, Tenant], python_slim: str, tmp_path: Path
) -> None:
    a, b = tenants
    secret = tmp_path / "settings.toml"
    secret.write_text(f"owner = 'tenant a' # {uuid.uuid4().hex}\n")
    image = Image.base(python_slim).add_local_file(secret, "/home/daytona/settings.toml")
    archive_path = image._context_list[0].archive_path
    assert archive_path is not None
    hasher = object.__new__(ObjectStorage)  # the SDK's own hash of A's file, nothing uploaded
    a_hash = hasher._compute_hash_for_path_md5(str(secret), archive_path)

    # B stores its own bytes under A's hash, then builds A's exact Dockerfile with it.
    planted = f"owner = 'tenant b' # {uuid.uuid4().hex}\n".encode()
    upload_as(b, a_hash, archive_path, planted)
    created = b.post(
        "/snapshots",
        {
            "name": unique("planted"),
            "buildInfo": {"dockerfileContent": image.dockerfile(), "contextHashes": [a_hash]},
        },
    )
    assert created.status_code == 200, created.text
    b_snapshot = b.settled_snapshot(created.json()["id"])
    assert b_snapshot["state"] == "build_failed", b_snapshot
    assert f"build context {a_hash} does not match its hash" in b_snapshot["errorReason"]

    # A builds its own Image: its own upload, its own image, its own bytes.
    name = unique("mine")
    a_snapshot = a.daytona.snapshot.create(CreateSnapshotParams(name=name, image=image), timeout=900)
    assert a_snapshot.state == "active"
    assert a_snapshot.ref != b_snapshot["ref"]
    assert read_in_sandbox(a, name, "/home/daytona/settings.toml") == secret.read_bytes()

    # B asking again (a cache hit before the fix) still gets no image out of the planted bytes.
    again = b.post(
        "/snapshots",
        {
            "name": unique("planted"),
            "buildInfo": {"dockerfileContent": image.dockerfile(), "contextHashes": [a_hash]},
        },
    )
    assert b.settled_snapshot(again.json()["id"])["state"] == "build_failed"


def test_identical_images_of_two_tenants_share_no_cache(
    tenants: tuple[Tenant, Tenant], python_slim: str
) -> None:
    a, b = tenants
    # A build step whose output differs on every run: shared only if a cached layer or image is reused.
    image = Image.base(python_slim).run_commands(
        f"head -c 16 /dev/urandom | od -An -tx1 > /made-for && echo {uuid.uuid4().hex}"
    )
    made: dict[str, tuple[str, bytes, str]] = {}
    for tenant in (a, b):
        name = unique("same")
        logs: list[str] = []
        snapshot = tenant.daytona.snapshot.create(
            CreateSnapshotParams(name=name, image=image), on_logs=logs.append, timeout=900
        )
        assert snapshot.state == "active"
        made[tenant.organization_id] = (
            snapshot.ref,
            read_in_sandbox(tenant, name, "/made-for"),
            "\n".join(logs),
        )
    (a_ref, a_bytes, _), (b_ref, b_bytes, b_log) = made[a.organization_id], made[b.organization_id]
    assert a_ref != b_ref
    assert a_bytes != b_bytes, "B's image holds the output of A's build step"
    assert "Using cached image" not in b_log


def test_another_tenants_image_cannot_back_a_snapshot(
    stack: StackThread, tenants: tuple[Tenant, Tenant], python_slim: str
) -> None:
    a, b = tenants
    name = unique("a-private")
    built = a.daytona.snapshot.create(
        CreateSnapshotParams(name=name, image=Image.base(python_slim).run_commands(f"echo {name} > /a-only")),
        timeout=900,
    )
    registry = stack.stack.env["TIDEPOOL_REGISTRY_URL"]
    assert registry, "the stack runs its registry"
    repository, tag = registry_reference(registry, built.ref)
    for image in (built.ref, f"{repository}:{tag}", built.ref.replace("localhost/", "", 1)):
        with pytest.raises(DaytonaError) as refused:
            b.daytona.snapshot.create(CreateSnapshotParams(name=unique("steal"), image=image), timeout=120)
        assert image in str(refused.value)
        status = b.post("/snapshots", {"name": unique("steal"), "imageName": image}).status_code
        assert status in (400, 404)
        from_line = b.post(
            "/snapshots", {"name": unique("steal"), "buildInfo": {"dockerfileContent": f"FROM {image}\n"}}
        )
        assert from_line.status_code in (400, 404), from_line.text
    assert not any(item["name"].startswith("steal") for item in b.get("/snapshots").json()["items"])

    # The platform's default image is everyone's.
    default = b.daytona.snapshot.create(
        CreateSnapshotParams(name=unique("b-default"), image=stack.stack.setting("default_image")),
        timeout=300,
    )
    assert default.state == "active"


def test_registering_an_image_another_tenant_uses_leaves_its_snapshot_alone(
    tenants: tuple[Tenant, Tenant], python_slim: str
) -> None:
    a, b = tenants
    a_name = unique("a-py")
    a.daytona.snapshot.create(CreateSnapshotParams(name=a_name, image=python_slim), timeout=300)
    before = a.get(f"/snapshots/{a_name}").json()
    assert before["state"] == "active"

    b_snapshot = b.daytona.snapshot.create(CreateSnapshotParams(name=unique("b-py"), image=python_slim))
    assert b_snapshot.state == "active"
    after = a.get(f"/snapshots/{a_name}").json()
    assert (after["state"], after["updatedAt"]) == ("active", before["updatedAt"]), (
        "B's events changed A's row"
    )
    assert read_in_sandbox(a, a_name, "/etc/hostname")


def registry_login(stack: StackThread) -> tuple[str, str]:
    credentials = json.loads((Path(stack.data_dir) / "registry-credentials.json").read_text())
    return credentials["username"], credentials["password"]


def test_the_internal_registry_needs_the_platforms_login(stack: StackThread) -> None:
    base = f"http://{stack.stack.env['TIDEPOOL_REGISTRY_URL']}/v2/_catalog"
    username, password = registry_login(stack)
    assert httpx.get(base).status_code == 401
    assert httpx.get(base, auth=(username, "wrong-" + password)).status_code == 401
    assert httpx.get(base, auth=(username, password)).status_code == 200
    for secret in ("registry-credentials.json", "registry.htpasswd"):
        assert (Path(stack.data_dir) / secret).stat().st_mode & 0o777 == 0o600
    assert password.encode() not in (Path(stack.data_dir) / "registry.htpasswd").read_bytes()

    # Only the builder and the runner are given the login.
    def environment(service: str) -> bytes:
        return Path(f"/proc/{stack.stack.children[service].process.pid}/environ").read_bytes()

    for service in ("builder", "runner"):
        assert f"TIDEPOOL_REGISTRY_PASSWORD={password}".encode() in environment(service)
    for service in ("api", "proxy", "scheduler", "telemetry"):
        assert password.encode() not in environment(service)


def local_tags_of(reference: str, engine_env: dict[str, str] | None = None) -> list[str]:
    env = {**os.environ, **engine_env} if engine_env else None
    image_id = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", reference],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    names = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{json .RepoTags}}", image_id],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return list(json.loads(names))


def test_runner_pulls_a_built_image_from_the_registry_with_the_login(
    stack: StackThread, tenants: tuple[Tenant, Tenant], python_slim: str
) -> None:
    a, _ = tenants
    name = unique("pulled")
    snapshot = a.daytona.snapshot.create(
        CreateSnapshotParams(name=name, image=Image.base(python_slim).run_commands(f"echo {name} > /marker")),
        timeout=900,
    )
    tags = local_tags_of(snapshot.ref, stack.stack.build_engine_env)
    assert any(tag.startswith(stack.stack.env["TIDEPOOL_REGISTRY_URL"]) for tag in tags), tags
    if stack.stack.build_engine_env:
        # Built and pushed by the build engine; the runner's engine never had it.
        for tag in tags:
            assert subprocess.run(["podman", "image", "exists", tag], check=False).returncode == 1, tag
    else:
        # Built on the runner's own engine: the image leaves it, so the runner has to pull it.
        for tag in tags:
            subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, check=False)
    assert read_in_sandbox(a, name, "/marker").decode().strip() == name
