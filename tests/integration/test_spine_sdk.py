"""The platform spine, end to end through the official SDK (daytona==0.226.1) against a real stack."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid

import httpx
import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    Daytona,
    DaytonaAuthenticationError,
    DaytonaConfig,
    DaytonaError,
    DaytonaNotFoundError,
)

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


def container_exists(sandbox_id: str) -> bool:
    result = subprocess.run(
        ["podman", "container", "exists", f"tidepool-{sandbox_id}"], capture_output=True, check=False
    )
    return result.returncode == 0


def test_sandbox_lifecycle_through_the_sdk(stack: StackThread) -> None:
    daytona = Daytona()  # DAYTONA_API_URL / DAYTONA_API_KEY from the environment, as users do
    sandbox = daytona.create()
    try:
        assert sandbox.state == "started"
        assert sandbox.cpu == 1 and sandbox.memory == 1 and sandbox.disk == 3
        assert sandbox.process.exec("echo hi").result == "hi\n"
        failing = sandbox.process.exec("exit 42")
        assert failing.exit_code == 42

        payload = os.urandom(1024 * 1024)
        sandbox.fs.upload_file(payload, "x.bin")
        assert sandbox.fs.download_file("x.bin") == payload
        assert sandbox.get_user_home_dir() == "/home/daytona"

        assert sandbox.id in {item.id for item in daytona.list()}

        sandbox.stop()
        assert sandbox.state == "stopped"
        sandbox.start()
        assert sandbox.state == "started"
        assert sandbox.fs.download_file("x.bin") == payload, "stop/start must keep the filesystem"
    finally:
        daytona.delete(sandbox)
    wait_until(lambda: not container_exists(sandbox.id), "delete must remove the container from the engine")
    with pytest.raises(DaytonaNotFoundError):
        daytona.get(sandbox.id)


def test_container_limits_and_isolation(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot="daytona-medium"))
    try:
        assert (sandbox.cpu, sandbox.memory) == (2, 4)
        inspect = subprocess.run(
            [
                "podman",
                "inspect",
                f"tidepool-{sandbox.id}",
                "--format",
                "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.Privileged}}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert inspect == [str(2 * 10**9), str(4 * 1024**3), "false"]
        assert sandbox.process.exec("id -un").result.strip() == "daytona"
    finally:
        daytona.delete(sandbox)


def test_other_organization_gets_404(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        tenant = httpx.post(
            f"{stack.api_url}/organizations",
            json={"name": "other"},
            headers={"Authorization": f"Bearer {stack.api_key}"},
        )
        assert tenant.status_code == 201, tenant.text
        other_key = tenant.json()["apiKey"]["value"]
        other = Daytona(DaytonaConfig(api_key=other_key, api_url=stack.api_url))
        with pytest.raises(DaytonaNotFoundError):
            other.get(sandbox.id)
        response = httpx.post(
            f"{stack.proxy_url}/toolbox/{sandbox.id}/process/execute",
            json={"command": "echo leaked"},
            headers={"Authorization": f"Bearer {other_key}"},
        )
        assert response.status_code == 404
        assert "leaked" not in response.text
        owner = httpx.post(
            f"{stack.proxy_url}/toolbox/{sandbox.id}/process/execute",
            json={"command": "echo mine"},
            headers={"Authorization": f"Bearer {stack.api_key}"},
        )
        assert owner.status_code == 200 and owner.json()["result"] == "mine\n"
    finally:
        daytona.delete(sandbox)


def test_bad_input_and_auth(stack: StackThread) -> None:
    daytona = Daytona()
    before = {item.id for item in daytona.list()}
    with pytest.raises(DaytonaError, match="Snapshot nope not found"):
        daytona.create(CreateSandboxFromSnapshotParams(snapshot="nope"))
    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    for body, fragment in [
        ('{"cpu": 0}', "cpu"),
        ('{"memory": -1}', "memory"),
        ("{broken", "JSON"),
    ]:
        response = httpx.post(f"{stack.api_url}/sandbox", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["message"]
    assert httpx.get(f"{stack.api_url}/sandbox").status_code == 401
    with pytest.raises(DaytonaAuthenticationError):
        list(Daytona(DaytonaConfig(api_key="tp_wrong", api_url=stack.api_url)).list())
    toolbox = httpx.get(f"{stack.proxy_url}/toolbox/whatever/version")
    assert toolbox.status_code == 401
    assert {item.id for item in daytona.list()} == before, "rejected creates must leave nothing behind"


def sandbox_containers() -> set[str]:
    listing = subprocess.run(
        ["podman", "ps", "-a", "--filter", "label=tidepool.sandbox", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listing.stdout.split())


def exec_when_reachable(sandbox: object, command: str, within: float = 60.0) -> str:
    """A restarted runner needs a moment before it relays toolbox traffic again."""

    def result() -> str | None:
        try:
            return str(sandbox.process.exec(command).result)  # type: ignore[attr-defined]
        except DaytonaError as error:
            if getattr(error, "status_code", None) not in (502, 503):
                raise
            return None

    return wait_until(result, f"the toolbox stayed unreachable (502/503) for {within} s", timeout=within)


def listed(stack: StackThread, labels: dict[str, str]) -> bool:
    """Whether the API holds a sandbox with these labels (its create request got through)."""
    response = httpx.get(
        f"{stack.api_url}/sandbox",
        params={"labels": json.dumps(labels)},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    return bool(response.json()["items"])


@pytest.mark.parametrize("service", ["scheduler", "runner"])
@pytest.mark.parametrize("moment", ["before", "during"])
def test_create_survives_a_crash(stack: StackThread, service: str, moment: str) -> None:
    """kill -9 a service with a create in flight: after its restart the sandbox starts, never stuck."""
    daytona = Daytona()
    created: dict[str, object] = {}
    labels = {"crash-test": uuid.uuid4().hex}

    def create() -> None:
        try:
            created["sandbox"] = daytona.create(CreateSandboxFromSnapshotParams(labels=labels), timeout=180)
        except Exception as error:  # reported by the assertion below
            created["error"] = error

    worker = threading.Thread(target=create)
    if moment == "before":
        stack.kill(service)  # the intent or job waits in JetStream
        worker.start()
        wait_until(lambda: listed(stack, labels), "the create request never reached the API", interval=0.01)
    else:
        existing = sandbox_containers()
        worker.start()
        if service == "runner":
            # Kill the runner between creating the container and seeing its daemon answer.
            wait_until(lambda: sandbox_containers() != existing, "no container was created", interval=0.01)
        else:
            # The intent is on its way to, or inside, the scheduler.
            wait_until(lambda: listed(stack, labels), "the create never reached the API", interval=0.01)
        stack.kill(service)
    stack.restart(service)
    worker.join(timeout=240)
    assert "error" not in created, f"create failed after a {service} crash: {created.get('error')}"
    sandbox = created["sandbox"]
    try:
        assert sandbox.state == "started"  # type: ignore[attr-defined]
        assert exec_when_reachable(sandbox, "echo alive") == "alive\n"
    finally:
        daytona.delete(sandbox)  # type: ignore[arg-type]
