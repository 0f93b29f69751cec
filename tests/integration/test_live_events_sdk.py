"""Live sandbox events over Socket.IO (issue #10 "Live events"; SDK wire contract §1.7), with the official
SDK's own event dispatcher and a plain python-socketio client, against a real stack."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import socketio
from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaConfig

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


@dataclass
class Listener:
    client: socketio.Client
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, sandbox_id: str) -> list[tuple[str, dict[str, Any]]]:
        def about(payload: dict[str, Any]) -> str:
            return str((payload.get("sandbox") or payload).get("id"))

        with self.lock:
            return [(name, payload) for name, payload in self.events if about(payload) == sandbox_id]


def listen(stack: StackThread, token: str) -> Listener:
    """A Socket.IO client connected as the SDK connects (websocket, token in the CONNECT auth)."""
    client = socketio.Client(reconnection=False)
    listener = Listener(client)
    for name in ("sandbox.created", "sandbox.state.updated"):

        def record(payload: dict[str, Any], name: str = name) -> None:
            with listener.lock:
                listener.events.append((name, payload))

        client.on(name, record)
    parts = urlsplit(stack.api_url)
    client.connect(
        f"{parts.scheme}://{parts.netloc}",
        socketio_path=f"{parts.path.rstrip('/')}/socket.io/",
        transports=["websocket"],
        auth={"token": token},
        wait_timeout=10,
    )
    return listener


@pytest.fixture(scope="module")
def other_tenant_key(stack: StackThread) -> str:
    response = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"live-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["apiKey"]["value"]


@pytest.fixture
def listeners(stack: StackThread, other_tenant_key: str) -> Iterator[tuple[Listener, Listener]]:
    mine, theirs = listen(stack, stack.api_key), listen(stack, other_tenant_key)
    try:
        yield mine, theirs
    finally:
        mine.client.disconnect()
        theirs.client.disconnect()


def test_events_reach_the_organization_and_no_one_else(
    stack: StackThread, listeners: tuple[Listener, Listener]
) -> None:
    mine, theirs = listeners
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(language="python"), timeout=180)
    try:

        def states() -> list[str]:
            return [p["newState"] for name, p in mine.of(sandbox.id) if name == "sandbox.state.updated"]

        wait_until(lambda: "started" in states(), message=lambda: f"no started event: {mine.of(sandbox.id)}")
        created = [p for name, p in mine.of(sandbox.id) if name == "sandbox.created"]
        assert len(created) == 1
        # A full Sandbox DTO, as the SDK's own model parses it.
        from daytona_api_client.models.sandbox import Sandbox as SandboxDto

        assert SandboxDto.from_dict(created[0]).id == sandbox.id
        started = next(p for name, p in mine.of(sandbox.id) if p.get("newState") == "started")
        assert started["sandbox"]["state"] == "started" and started["oldState"] != "started"
        assert SandboxDto.from_dict(started["sandbox"]).organization_id == created[0]["organizationId"]

        daytona.stop(sandbox)
        wait_until(lambda: "stopped" in states(), message=lambda: f"no stopped event: {states()}")
        assert states().index("started") < states().index("stopped")
    finally:
        daytona.delete(sandbox)
    wait_until(lambda: "destroyed" in states() or "destroying" in states())
    assert theirs.of(sandbox.id) == []  # tenants never see each other


def test_connections_without_a_valid_key_are_refused(stack: StackThread) -> None:
    for token in ("", "tp_not-a-key"):
        with pytest.raises(socketio.exceptions.ConnectionError):
            listen(stack, token)


def test_the_sdk_dispatcher_connects_and_receives(stack: StackThread) -> None:
    daytona = Daytona(DaytonaConfig(api_key=stack.api_key, api_url=stack.api_url))
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(language="python"), timeout=180)
    try:
        dispatcher = daytona._event_dispatcher  # the SDK's own Socket.IO client
        assert dispatcher is not None
        wait_until(lambda: dispatcher.is_connected, message="the SDK's Socket.IO dispatcher did not connect")
        daytona.stop(sandbox)
        assert sandbox.state == "stopped"
    finally:
        daytona.delete(sandbox)
