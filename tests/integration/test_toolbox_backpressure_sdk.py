"""Back-pressure on the toolbox path (issue #10): past its capacity the proxy refuses toolbox requests at
once with 503, `Retry-After` and a JSON message, the admitted ones complete, and the official SDK raises
`DaytonaServiceUnavailableError`. Long-lived requests (here: a file upload) pass even while it is full.

A stack of its own whose proxy admits 3 toolbox requests at once (TIDEPOOL_PROXY_TOOLBOX_MAX_IN_FLIGHT)
and whose slots are held until a request completes (TIDEPOOL_TOOLBOX_SLOT_HOLD_SECONDS=0; by default a
request running longer than a second gives its slot up, which would free the blockers' slots here);
everything else is as `make up` runs it (a full proxy lets a request wait 50 ms for a slot).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from daytona import Daytona, DaytonaConfig, DaytonaServiceUnavailableError, ExecuteResponse, Sandbox

from tests.integration.stackthread import StackThread, own_stack
from tests.polling import wait_until

pytestmark = pytest.mark.integration
CAPACITY = 3
FLOOD = 16
# Holds its slot until the test creates /tmp/release (by an upload, which is exempt from admission).
BLOCKER = "while [ ! -e /tmp/release ]; do sleep 0.05; done; echo released"


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackThread]:
    with own_stack(
        tmp_path_factory.mktemp("backpressure"),
        extra_env={
            "TIDEPOOL_PROXY_TOOLBOX_MAX_IN_FLIGHT": str(CAPACITY),
            "TIDEPOOL_TOOLBOX_SLOT_HOLD_SECONDS": "0",
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def sandbox(small_stack: StackThread) -> Iterator[Sandbox]:
    daytona = Daytona(DaytonaConfig(api_key=small_stack.api_key, api_url=small_stack.api_url))
    created = daytona.create()
    try:
        yield created
    finally:
        daytona.delete(created)


def exec_through_proxy(stack: StackThread, sandbox: Sandbox, command: str) -> httpx.Response:
    return httpx.post(
        f"{stack.proxy_url}/toolbox/{sandbox.id}/process/execute",
        json={"command": command},
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=120,
    )


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    body = response.json()
    assert body["statusCode"] == 503
    assert f"toolbox proxy is at capacity ({CAPACITY} toolbox requests in flight)" in body["message"]


def test_a_full_proxy_refuses_with_retry_after_and_the_admitted_requests_complete(
    small_stack: StackThread, sandbox: Sandbox
) -> None:
    with ThreadPoolExecutor(max_workers=CAPACITY + FLOOD) as pool:

        def blocker_once() -> ExecuteResponse | None:
            try:
                return sandbox.process.exec(BLOCKER, timeout=300)
            except DaytonaServiceUnavailableError:  # a probe held the slot just then: retry, as told
                return None

        blockers = [
            pool.submit(wait_until, blocker_once, "a blocker was never admitted", timeout=300)
            for _ in range(CAPACITY)
        ]

        # Probes one at a time: a probe admitted while a blocker is not yet in finishes at once; the first
        # refused one proves the blockers hold every slot (nothing else is in flight), until released.
        def probe_refused() -> httpx.Response | None:
            response = exec_through_proxy(small_stack, sandbox, "true")
            if response.status_code == 200:
                assert response.json()["exitCode"] == 0
                return None
            return response

        assert_refused(wait_until(probe_refused, "the blockers never filled the proxy", timeout=120))

        # A flood while full: every request is refused, at once, with the same answer.
        start = threading.Barrier(FLOOD)

        def flood_one() -> httpx.Response:
            start.wait()
            return exec_through_proxy(small_stack, sandbox, "sleep 1")

        for refused in pool.map(lambda _: flood_one(), range(FLOOD)):
            assert_refused(refused)

        # The official SDK surfaces the refusal as an error with its status and Retry-After.
        with pytest.raises(DaytonaServiceUnavailableError) as raised:
            sandbox.process.exec("echo never")
        assert raised.value.status_code == 503
        assert {name.lower(): value for name, value in raised.value.headers.items()}["retry-after"] == "1"
        assert "at capacity" in raised.value.message

        # An upload is long-lived, so exempt: it passes while the proxy is full, and releases the blockers.
        sandbox.fs.upload_file(b"go", "/tmp/release")
        for blocker in blockers:
            response = blocker.result(timeout=300)
            assert (response.exit_code, response.result.strip()) == (0, "released")

    # After the flood the proxy admits again.
    assert sandbox.process.exec("echo back").result.strip() == "back"


def test_a_concurrent_flood_of_long_execs_is_partly_refused_and_the_admitted_ones_succeed(
    small_stack: StackThread, sandbox: Sandbox
) -> None:
    start = threading.Barrier(FLOOD)

    def flood_one(_: int) -> httpx.Response:
        start.wait()
        return exec_through_proxy(small_stack, sandbox, "sleep 1; echo slept")

    with ThreadPoolExecutor(max_workers=FLOOD) as pool:
        responses = list(pool.map(flood_one, range(FLOOD)))
    admitted = [response for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code != 200]
    # 16 execs of a second each, started together, against 3 slots: at most 3 run at once.
    assert refused, "16 concurrent one-second execs were all admitted by a proxy that admits 3"
    assert admitted, "every exec was refused"
    for response in refused:
        assert_refused(response)
    for response in admitted:
        assert (response.json()["exitCode"], response.json()["result"].strip()) == (0, "slept")
    assert sandbox.process.exec("echo back").result.strip() == "back"
