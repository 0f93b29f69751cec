"""Toolbox admission (tidepool_runtime.admission): the slot counting and which requests are exempt."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from tests.polling import wait_until_async
from tidepool_contracts.toolbox_routes import TOOLBOX_ROUTES, is_long_lived
from tidepool_runtime.admission import Admission, admitted


async def test_admits_up_to_capacity_then_refuses_until_a_slot_is_free() -> None:
    admission = Admission(2)
    assert await admission.enter()
    assert await admission.enter()
    assert not await admission.enter()
    assert not await admission.enter()
    assert (admission.in_flight, admission.admitted, admission.refused) == (2, 2, 2)
    admission.leave()
    assert await admission.enter()
    assert not await admission.enter()
    assert (admission.in_flight, admission.admitted, admission.refused) == (2, 3, 3)


async def test_a_waiting_request_goes_before_a_newcomer() -> None:
    admission = Admission(2, queue_wait=30)
    assert await admission.enter()
    assert await admission.enter()
    waiting = asyncio.create_task(admission.enter())
    await wait_until_async(lambda: admission.waiting == 1)
    admission.leave()
    # The slot went to the waiting request, not to a newcomer arriving in the same moment.
    assert not admission.try_enter()
    assert await waiting
    assert admission.in_flight == 2


async def test_a_freed_slot_goes_to_the_longest_waiting_request() -> None:
    admission = Admission(2, queue_wait=30)
    assert await admission.enter()
    assert await admission.enter()
    first = asyncio.create_task(admission.enter())
    second = asyncio.create_task(admission.enter())
    await wait_until_async(lambda: admission.waiting == 2)
    admission.leave()
    assert await first
    assert not second.done()
    assert (admission.in_flight, admission.waiting) == (2, 1)
    admission.leave()
    assert await second
    admission.leave()
    admission.leave()
    assert (admission.in_flight, admission.waiting, admission.admitted, admission.refused) == (0, 0, 4, 0)


async def test_a_wait_that_runs_out_is_a_refusal() -> None:
    admission = Admission(1, queue_wait=0.01)
    assert await admission.enter()
    assert not await admission.enter()
    assert (admission.in_flight, admission.waiting, admission.refused) == (1, 0, 1)
    admission.leave()
    assert admission.in_flight == 0


async def test_the_queue_holds_at_most_capacity_requests() -> None:
    admission = Admission(2, queue_wait=30)
    assert await admission.enter()
    assert await admission.enter()
    waiting = [asyncio.create_task(admission.enter()) for _ in range(2)]
    await wait_until_async(lambda: admission.waiting == 2)
    assert not await admission.enter()  # refused at once: the queue is full
    assert admission.refused == 1
    admission.leave()
    admission.leave()
    assert await asyncio.gather(*waiting) == [True, True]


async def test_a_longer_queue_absorbs_a_burst_larger_than_the_slots() -> None:
    admission = Admission(1, queue_wait=30, queue_length=3)
    assert await admission.enter()
    waiting = [asyncio.create_task(admission.enter()) for _ in range(3)]
    await wait_until_async(lambda: admission.waiting == 3)
    assert not await admission.enter()  # the fifth: the queue of 3 is full
    for _ in range(3):
        admission.leave()  # hands its slot to the longest waiting request
    assert await asyncio.gather(*waiting) == [True, True, True]


async def test_a_client_gone_while_waiting_leaves_the_queue() -> None:
    admission = Admission(1, queue_wait=30)
    assert await admission.enter()
    gone = asyncio.create_task(admission.enter())
    await wait_until_async(lambda: admission.waiting == 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert admission.waiting == 0
    admission.leave()
    assert admission.in_flight == 0


async def test_a_request_running_past_hold_gives_its_slot_to_the_next() -> None:
    admission = Admission(1, hold=0.05)
    finish = asyncio.Event()
    request = make_mocked_request("POST", "/process/execute")

    async def long_exec() -> web.StreamResponse:
        await finish.wait()
        return web.Response(text="done")

    running = asyncio.create_task(admitted(admission, request, "/process/execute", long_exec))
    await wait_until_async(lambda: admission.released_early == 1)
    assert admission.in_flight == 0
    assert (await admitted(admission, request, "/process/execute", long_exec_done)).status == 200
    finish.set()
    assert (await running).text == "done"
    assert (admission.in_flight, admission.admitted, admission.refused) == (0, 2, 0)


async def long_exec_done() -> web.StreamResponse:
    return web.Response(text="quick")


async def test_refused_and_exempt_requests_through_admitted() -> None:
    admission = Admission(1, retry_after_seconds=2, hop="runner")
    assert admission.try_enter()
    refused = await admitted(
        admission, make_mocked_request("POST", "/x/process/execute"), "/process/execute", long_exec_done
    )
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "2"
    assert "runner is at capacity (1 toolbox requests in flight)" in refused.text
    download = make_mocked_request("GET", "/x/files/download?path=a")
    assert (await admitted(admission, download, "/files/download", long_exec_done)).status == 200
    upgrade = make_mocked_request(
        "GET", "/x/process/pty/p/connect", headers={"Connection": "Upgrade", "Upgrade": "websocket"}
    )
    assert (await admitted(admission, upgrade, "/process/pty/p/connect", long_exec_done)).status == 200
    assert (admission.in_flight, admission.admitted, admission.refused) == (1, 1, 1)


async def test_capacity_zero_is_unbounded() -> None:
    admission = Admission(0)
    for _ in range(10_000):
        assert await admission.enter()
    assert (admission.in_flight, admission.refused) == (10_000, 0)


def test_a_slot_given_back_twice_is_an_error() -> None:
    admission = Admission(1)
    assert admission.try_enter()
    admission.leave()
    with pytest.raises(RuntimeError):
        admission.leave()
    assert admission.in_flight == 0


@pytest.mark.parametrize(
    ("method", "path", "follow"),
    [
        ("GET", "/files/download", False),
        ("POST", "/files/bulk-download", False),
        ("POST", "/files/bulk-upload", False),
        ("POST", "/files/upload-v2", False),
        ("GET", "/process/session/s-1/command/c-1/logs", True),
        ("GET", "/process/session/entrypoint/logs", True),
        ("get", "/files/download/", False),
    ],
)
def test_long_lived_requests(method: str, path: str, follow: bool) -> None:
    assert is_long_lived(method, path, follow)


@pytest.mark.parametrize(
    ("method", "path", "follow"),
    [
        ("POST", "/process/execute", False),
        ("POST", "/process/execute", True),
        ("GET", "/process/session/s-1/command/c-1/logs", False),  # a plain read of the logs so far
        ("GET", "/process/session/entrypoint/logs", False),
        ("GET", "/process/session/s-1/command/c-1", True),
        ("GET", "/files", True),
        ("GET", "/files/info", False),
        ("POST", "/process/code-run", False),
    ],
)
def test_requests_that_hold_a_slot(method: str, path: str, follow: bool) -> None:
    assert not is_long_lived(method, path, follow)


def test_every_long_lived_transfer_is_a_toolbox_route() -> None:
    routes = set(TOOLBOX_ROUTES)
    for method, path in (
        ("GET", "/files/download"),
        ("POST", "/files/bulk-download"),
        ("POST", "/files/bulk-upload"),
        ("POST", "/files/upload-v2"),
        ("GET", "/process/session/entrypoint/logs"),
        ("GET", "/process/session/{sessionId}/command/{commandId}/logs"),
    ):
        assert (method, path) in routes
