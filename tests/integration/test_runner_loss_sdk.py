"""Runner loss and drain (issue #10), through the official SDK and the admin's `/runners` routes.

- cordon / drain / uncordon: admin organization only (404 for a tenant); a cordoned runner gets no new
  sandbox (the create waits: the scheduler retries the placement, backing off, and fails it saying why
  after ~5 minutes) while the ones it hosts keep working; a draining runner is `drained` once it hosts
  nothing; uncordoned, the waiting sandbox is placed;
- loss: the runner process is killed (SIGKILL, as a crash); once its heartbeats are older than
  TIDEPOOL_RUNNER_LOST_AFTER_SECONDS its sandbox reports a recoverable `error` naming the lost runner,
  and `/runners` shows it `unresponsive`; restarted, its heartbeats make it schedulable again and the
  sandbox reconciles to `started`, its files intact (its container never stopped).

A stack of its own whose runner beats every second and is lost after 5 s of silence; everything else as
`make up` runs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    Daytona,
    DaytonaConfig,
    DaytonaTimeoutError,
    ListSandboxesQuery,
    Sandbox,
)

from tests.integration.stackthread import StackThread, own_stack
from tests.polling import wait_until

pytestmark = pytest.mark.integration
LOST_AFTER_SECONDS = 5


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackThread]:
    with own_stack(
        tmp_path_factory.mktemp("runner-loss"),
        extra_env={
            "TIDEPOOL_RUNNER_HEARTBEAT_INTERVAL_SECONDS": "1",
            "TIDEPOOL_RUNNER_LOST_AFTER_SECONDS": str(LOST_AFTER_SECONDS),
            "TIDEPOOL_RECONCILE_INTERVAL_SECONDS": "1",
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def daytona(fleet_stack: StackThread) -> Daytona:
    return Daytona(DaytonaConfig(api_key=fleet_stack.api_key, api_url=fleet_stack.api_url))


def admin(stack: StackThread, method: str, path: str, key: str | None = None) -> httpx.Response:
    return httpx.request(
        method, f"{stack.api_url}{path}", headers={"Authorization": f"Bearer {key or stack.api_key}"}
    )


def the_runner(stack: StackThread) -> dict:
    listed = admin(stack, "GET", "/runners")
    assert listed.status_code == 200, listed.text
    runners = listed.json()
    assert len(runners) == 1, runners
    return runners[0]


def state_of(daytona: Daytona, sandbox: Sandbox) -> str:
    state = daytona.get(sandbox.id).state
    return str(getattr(state, "value", state))


def test_runner_routes_are_the_admins_only(fleet_stack: StackThread) -> None:
    tenant = httpx.post(
        f"{fleet_stack.api_url}/organizations",
        json={"name": "runner-tenant"},
        headers={"Authorization": f"Bearer {fleet_stack.api_key}"},
    )
    assert tenant.status_code == 201, tenant.text
    tenant_key = tenant.json()["apiKey"]["value"]
    runner_id = the_runner(fleet_stack)["id"]
    for method, path in (
        ("GET", "/runners"),
        ("GET", f"/runners/{runner_id}"),
        ("POST", f"/runners/{runner_id}/cordon"),
        ("POST", f"/runners/{runner_id}/drain"),
        ("POST", f"/runners/{runner_id}/uncordon"),
    ):
        assert admin(fleet_stack, method, path, tenant_key).status_code == 404, (method, path)
    assert admin(fleet_stack, "GET", "/runners/no-such-runner").status_code == 404
    assert admin(fleet_stack, "POST", "/runners/no-such-runner/cordon").status_code == 404
    assert the_runner(fleet_stack)["unschedulable"] is False


def test_a_cordoned_runner_gets_no_new_sandbox_and_a_drained_one_reports_it(
    fleet_stack: StackThread, daytona: Daytona
) -> None:
    runner = the_runner(fleet_stack)
    assert (runner["state"], runner["unschedulable"], runner["cordoned"]) == ("ready", False, False)
    hosted = daytona.create()
    try:
        cordoned = admin(fleet_stack, "POST", f"/runners/{runner['id']}/cordon")
        assert cordoned.status_code == 200, cordoned.text
        assert (cordoned.json()["cordoned"], cordoned.json()["unschedulable"]) == (True, True)

        # The scheduler finds no runner for a new sandbox and keeps its intent for later (backing off).
        with pytest.raises(DaytonaTimeoutError):
            daytona.create(CreateSandboxFromSnapshotParams(labels={"test": "cordoned"}), timeout=15)
        (waiting,) = list(daytona.list(ListSandboxesQuery(labels={"test": "cordoned"})))
        assert state_of(daytona, waiting) not in ("started", "error")
        # What it hosts keeps working.
        assert hosted.process.exec("echo still").result.strip() == "still"

        drained = admin(fleet_stack, "POST", f"/runners/{runner['id']}/drain")
        assert drained.status_code == 200, drained.text
        assert (drained.json()["draining"], drained.json()["drained"]) == (True, False)
    finally:
        daytona.delete(hosted)
    wait_until(
        lambda: the_runner(fleet_stack)["drained"], "the drained runner never reported drained", timeout=60
    )
    assert state_of(daytona, waiting) not in ("started", "error")

    # Uncordoned, it takes sandboxes again: the waiting one is placed at the scheduler's next try.
    uncordoned = admin(fleet_stack, "POST", f"/runners/{runner['id']}/uncordon")
    assert uncordoned.status_code == 200, uncordoned.text
    assert (uncordoned.json()["cordoned"], uncordoned.json()["draining"]) == (False, False)
    try:
        wait_until(
            lambda: state_of(daytona, waiting) == "started",
            lambda: f"the waiting sandbox stayed {state_of(daytona, waiting)} after the uncordon",
            timeout=180,
        )
        waiting.refresh_data()
        assert waiting.process.exec("echo placed").result.strip() == "placed"
    finally:
        daytona.delete(waiting)


def test_a_lost_runner_errors_its_sandboxes_and_they_reconcile_when_it_returns(
    fleet_stack: StackThread, daytona: Daytona
) -> None:
    runner_id = the_runner(fleet_stack)["id"]
    sandbox = daytona.create()
    try:
        sandbox.fs.upload_file(b"kept", "kept.txt")
        fleet_stack.kill("runner")

        wait_until(
            lambda: state_of(daytona, sandbox) == "error", "the sandbox never reported the loss", timeout=120
        )
        lost = daytona.get(sandbox.id)
        assert lost.error_reason == (
            f"runner {runner_id} was lost: no heartbeat for more than {LOST_AFTER_SECONDS} s"
        )
        assert lost.recoverable is True
        runner = admin(fleet_stack, "GET", f"/runners/{runner_id}")
        assert runner.status_code == 200, runner.text
        assert (runner.json()["state"], runner.json()["unschedulable"]) == ("unresponsive", True)

        fleet_stack.restart("runner")
        wait_until(
            lambda: state_of(daytona, sandbox) == "started",
            lambda: f"the sandbox stayed {state_of(daytona, sandbox)} after its runner returned",
            timeout=120,
        )
        back = the_runner(fleet_stack)
        assert (back["id"], back["state"], back["unschedulable"]) == (runner_id, "ready", False)
        sandbox.refresh_data()
        assert sandbox.error_reason is None
        assert sandbox.fs.download_file("kept.txt") == b"kept"
        assert sandbox.process.exec("echo back").result.strip() == "back"
    finally:
        daytona.delete(sandbox)
