"""Idle timers through the official SDK (issue #10 "Idle timers"; behaviour spec "sandboxes": intervals in
minutes, autostop 0 = never, autodelete -1 = never and 0 = on stop).

A stack of its own whose "minute" lasts 2 s (TIDEPOOL_LIFECYCLE_MINUTE_SECONDS) and whose timers tick
twice a second, so the timers run in seconds; everything else is as `make up` runs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    Daytona,
    DaytonaConfig,
    DaytonaError,
    DaytonaNotFoundError,
    Sandbox,
)

from tests.integration.stackthread import StackThread, own_stack
from tests.polling import wait_until

pytestmark = pytest.mark.integration
MINUTE_SECONDS = 2.0


@pytest.fixture(scope="module")
def fast_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackThread]:
    with own_stack(
        tmp_path_factory.mktemp("lifecycle"),
        extra_env={
            "TIDEPOOL_LIFECYCLE_MINUTE_SECONDS": str(MINUTE_SECONDS),
            "TIDEPOOL_LIFECYCLE_TICK_SECONDS": "0.5",
            "TIDEPOOL_ACTIVITY_WRITE_INTERVAL_SECONDS": "0.5",
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def daytona(fast_stack: StackThread) -> Daytona:
    return Daytona(DaytonaConfig(api_key=fast_stack.api_key, api_url=fast_stack.api_url))


def state_of(daytona: Daytona, sandbox: Sandbox) -> str:
    try:
        state = daytona.get(sandbox.id).state  # polling GET: not activity
    except DaytonaNotFoundError:
        return "gone"
    return str(getattr(state, "value", state))


def events_of(stack: StackThread, sandbox: Sandbox) -> list[dict]:
    response = httpx.get(
        f"{stack.api_url}/sandbox/{sandbox.id}/events", headers={"Authorization": f"Bearer {stack.api_key}"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return body["items"] if isinstance(body, dict) else body


def test_an_idle_sandbox_stops_by_itself_and_use_keeps_it_awake(
    daytona: Daytona, fast_stack: StackThread
) -> None:
    # Generous intervals (4 "minutes" = 8 s) and `busy` created last: a slow create must not let it idle out
    # before its first use.
    never = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", auto_stop_interval=0), timeout=180
    )
    idle = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", auto_stop_interval=4), timeout=180
    )
    busy = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", auto_stop_interval=4), timeout=180
    )
    try:
        # `busy` is used every half second; `idle` only polled through the API, which is not activity.
        def idle_stopped() -> bool:
            # Use: the runner records it before relaying, so even a call answered late counts.
            with contextlib.suppress(DaytonaError):
                busy.process.exec("true")
            return state_of(daytona, idle) == "stopped"

        wait_until(idle_stopped, timeout=60, interval=0.5, message="the idle sandbox did not stop")
        assert state_of(daytona, busy) == "started"
        assert state_of(daytona, never) == "started"  # 0: never, though idle as long as `idle` was
        stopped = [event for event in events_of(fast_stack, idle) if event.get("cause")]
        assert [(e["newState"], e["cause"]) for e in stopped] == [("stopping", "auto_stop")], stopped
        desired = daytona.get(idle.id).desired_state
        assert getattr(desired, "value", desired) == "stopped"  # the platform stopped it, and says so
        # Started again by its user, it runs (and would stop again when idle).
        idle.start()
        assert idle.process.exec("echo back").result.strip() == "back"
    finally:
        for sandbox in (idle, busy, never):
            daytona.delete(sandbox)


def test_an_ephemeral_sandbox_is_deleted_when_it_stops(daytona: Daytona) -> None:
    sandbox = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", ephemeral=True, auto_stop_interval=0), timeout=180
    )
    assert sandbox.auto_delete_interval == 0
    sandbox.stop()
    wait_until(lambda: state_of(daytona, sandbox) in ("destroyed", "gone"), timeout=60, interval=0.5)


def test_auto_delete_after_its_interval_and_minus_one_keeps(daytona: Daytona) -> None:
    doomed = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", auto_stop_interval=0), timeout=180
    )
    kept = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", auto_stop_interval=0), timeout=180
    )
    try:
        doomed.set_auto_delete_interval(1)
        kept.set_auto_delete_interval(-1)
        doomed.stop()
        kept.stop()
        wait_until(lambda: state_of(daytona, doomed) in ("destroyed", "gone"), timeout=60, interval=0.5)
        assert state_of(daytona, kept) == "stopped"
    finally:
        daytona.delete(kept)


def test_interval_setters_and_their_refusals(daytona: Daytona) -> None:
    sandbox = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", auto_stop_interval=0), timeout=180
    )
    try:
        sandbox.set_autostop_interval(30)
        sandbox.set_auto_delete_interval(-1)
        sandbox.set_auto_delete_interval(0)
        sandbox.refresh_data()
        assert (sandbox.auto_stop_interval, sandbox.auto_delete_interval) == (30, 0)
        for setter, value in ((sandbox.set_autostop_interval, -1), (sandbox.set_auto_delete_interval, -2)):
            with pytest.raises(Exception) as caught:
                setter(value)
            assert "400" in str(caught.value) or "must" in str(caught.value)
        sandbox.set_autostop_interval(0)
    finally:
        daytona.delete(sandbox)


def test_auto_archive_after_its_interval_then_start_restores(
    daytona: Daytona, fast_stack: StackThread
) -> None:
    sandbox = daytona.create(
        CreateSandboxFromSnapshotParams(language="python", auto_stop_interval=0), timeout=180
    )
    try:
        sandbox.fs.upload_file(b"kept through the archive", "kept.txt")
        sandbox.set_auto_archive_interval(1)
        sandbox.stop()
        wait_until(lambda: state_of(daytona, sandbox) == "archived", timeout=180, interval=0.5)
        causes = [event.get("cause") for event in events_of(fast_stack, sandbox)]
        assert "auto_archive" in causes, causes
        sandbox.start(timeout=180)
        assert sandbox.fs.download_file("kept.txt") == b"kept through the archive"
    finally:
        daytona.delete(sandbox)
