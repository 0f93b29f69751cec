"""Structured termination reaches the API: abnormal process endings show up among the sandbox's events."""

from __future__ import annotations

import contextlib

import httpx
import pytest
from daytona import Daytona, DaytonaError

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


def wait_for_events(stack: StackThread, sandbox_id: str, wanted: int, within: float = 30.0) -> list[dict]:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    seen: list[dict] = []

    def enough() -> bool:
        response = httpx.get(f"{stack.api_url}/sandbox/{sandbox_id}/events", headers=headers)
        assert response.status_code == 200, response.text
        seen[:] = response.json()
        return len([event for event in seen if event["type"] == "sandbox.process.terminated"]) >= wanted

    with contextlib.suppress(AssertionError):  # the caller's assertions say what is missing
        wait_until(enough, timeout=within)
    return seen


def test_timeouts_and_signals_become_sandbox_events(stack: StackThread) -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        with pytest.raises(DaytonaError, match=r"(?i)timeout"):
            sandbox.process.exec("sleep 30", timeout=1)
        killed = sandbox.process.exec("kill -TERM $$")
        assert killed.exit_code == 128 + 15
        assert sandbox.process.exec("true").exit_code == 0  # plain exits are not events

        events = wait_for_events(stack, sandbox.id, wanted=2)
        processes = [event for event in events if event["type"] == "sandbox.process.terminated"]
        reasons = sorted((event["reason"], event["signal"]) for event in processes)
        assert reasons == [("signal", 15), ("timeout", 9)], processes
        assert {event["kind"] for event in processes} == {"exec"}
        assert any("sleep 30" in event["command"] for event in processes)
        states = [event["newState"] for event in events if event["type"] == "sandbox.state.updated"]
        assert "started" in states
    finally:
        daytona.delete(sandbox)
    other = httpx.get(
        f"{stack.api_url}/sandbox/{sandbox.id}/events", headers={"Authorization": "Bearer tp_x"}
    )
    assert other.status_code == 401
