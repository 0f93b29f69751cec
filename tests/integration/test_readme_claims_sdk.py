"""README claims that had no test (issue #18), through the official SDK and REST against a real stack:
snapshot activate/deactivate and digest references, another organization's 404 on snapshots, registries,
events and build logs, and registry passwords stored as ciphertext."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    Daytona,
    DaytonaError,
)
from daytona.common.snapshot import Snapshot
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def owner_headers(stack: StackThread) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


@pytest.fixture(scope="module")
def other_headers(stack: StackThread) -> dict[str, str]:
    """Another organization's own key."""
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": unique("other")},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['apiKey']['value']}"}


@pytest.fixture(scope="module")
def snapshot(stack: StackThread) -> Iterator[Snapshot]:
    """The owner's snapshot, referenced by digest (the local stand-in for python:3.12 slim)."""
    tagged = ensure_python_slim_stand_in()
    digest = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Digest}}", tagged],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert digest.startswith("sha256:"), digest
    by_digest = f"{tagged.rsplit(':', 1)[0]}@{digest}"
    daytona = Daytona()
    created = daytona.snapshot.create(CreateSnapshotParams(name=unique("by-digest"), image=by_digest))
    try:
        yield created
    finally:
        daytona.snapshot.delete(daytona.snapshot.get(created.name))


def test_snapshot_from_a_digest_reference_runs(snapshot: Snapshot) -> None:
    assert snapshot.state == "active"
    assert "@sha256:" in snapshot.image_name
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=snapshot.name))
    try:
        assert sandbox.process.exec("python3 -c 'print(6*7)'").result.strip() == "42"
    finally:
        daytona.delete(sandbox)


def test_deactivated_snapshot_cannot_back_a_sandbox_until_activated(
    stack: StackThread, snapshot: Snapshot, owner_headers: dict[str, str]
) -> None:
    daytona = Daytona()
    # The SDK has activate() only; deactivation is the REST call the dashboard makes.
    deactivated = httpx.post(f"{stack.api_url}/snapshots/{snapshot.id}/deactivate", headers=owner_headers)
    assert deactivated.status_code == 204, deactivated.text
    assert daytona.snapshot.get(snapshot.name).state == "inactive"
    with pytest.raises(DaytonaError):
        daytona.create(CreateSandboxFromSnapshotParams(snapshot=snapshot.name), timeout=120)
    activated = daytona.snapshot.activate(snapshot)
    assert activated.state in ("pending", "pulling", "active")
    # Activation re-verifies the image before the snapshot is active again.
    wait_until(lambda: daytona.snapshot.get(snapshot.name).state == "active", "inactive still", timeout=300)
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=snapshot.name), timeout=300)
    try:
        assert sandbox.process.exec("echo back").result == "back\n"
    finally:
        daytona.delete(sandbox)


def test_another_organization_gets_404_on_snapshots_registries_events_and_build_logs(
    stack: StackThread, snapshot: Snapshot, owner_headers: dict[str, str], other_headers: dict[str, str]
) -> None:
    api = stack.api_url
    registry = httpx.post(
        f"{api}/docker-registry",
        json={"name": unique("reg"), "url": "https://registry.invalid", "username": "u", "password": "p"},
        headers=owner_headers,
    )
    assert registry.status_code == 201, registry.text
    registry_id = registry.json()["id"]
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        attempts = [
            ("GET", f"/snapshots/{snapshot.id}"),
            ("GET", f"/snapshots/{snapshot.name}"),
            ("POST", f"/snapshots/{snapshot.id}/activate"),
            ("POST", f"/snapshots/{snapshot.id}/deactivate"),
            ("GET", f"/snapshots/{snapshot.id}/build-logs"),
            ("GET", f"/snapshots/{snapshot.id}/build-logs-url"),
            ("DELETE", f"/snapshots/{snapshot.id}"),
            ("GET", f"/docker-registry/{registry_id}"),
            ("PATCH", f"/docker-registry/{registry_id}"),
            ("DELETE", f"/docker-registry/{registry_id}"),
            ("GET", f"/sandbox/{sandbox.id}/events"),
            ("GET", f"/sandbox/{sandbox.id}/build-logs"),
        ]
        for method, path in attempts:
            body = {"name": "n", "url": "https://r.invalid", "username": "x"} if method == "PATCH" else None
            response = httpx.request(method, f"{api}{path}", json=body, headers=other_headers, timeout=30)
            assert response.status_code == 404, (method, path, response.status_code, response.text)
        listed = httpx.get(f"{api}/docker-registry", headers=other_headers).json()
        assert registry_id not in str(listed)
        # Nothing of the owner's changed, and the owner still sees all of it.
        assert daytona.snapshot.get(snapshot.name).state == "active"
        assert httpx.get(f"{api}/docker-registry/{registry_id}", headers=owner_headers).status_code == 200
        assert httpx.get(f"{api}/sandbox/{sandbox.id}/events", headers=owner_headers).status_code == 200
    finally:
        daytona.delete(sandbox)
        httpx.delete(f"{api}/docker-registry/{registry_id}", headers=owner_headers)


async def stored_password(stack: StackThread, registry_id: str) -> str:
    """The registry row's stored password, read from the stack's own database (PostgreSQL or SQLite)."""
    url = stack.config.database_url or f"sqlite+aiosqlite:///{stack.data_dir / 'tidepool.db'}"
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                text("SELECT password_sealed FROM docker_registry WHERE id = :id"), {"id": registry_id}
            )
            return str(result.scalar_one())
    finally:
        await engine.dispose()


def test_registry_passwords_are_ciphertext_in_the_database(
    stack: StackThread, owner_headers: dict[str, str]
) -> None:
    password = f"plain-{uuid.uuid4().hex}"
    created = httpx.post(
        f"{stack.api_url}/docker-registry",
        json={"name": unique("sealed"), "url": "https://r.invalid", "username": "u", "password": password},
        headers=owner_headers,
    )
    assert created.status_code == 201, created.text
    registry_id = created.json()["id"]
    try:
        sealed = asyncio.run(stored_password(stack, registry_id))
        assert sealed and password not in sealed
        if not stack.config.database_url:
            # SQLite: nowhere in the database files either (the write-ahead log included).
            for path in stack.data_dir.glob("tidepool.db*"):
                assert password.encode() not in path.read_bytes(), path
    finally:
        httpx.delete(f"{stack.api_url}/docker-registry/{registry_id}", headers=owner_headers)
