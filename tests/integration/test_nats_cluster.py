"""Issue #17: the bus as Kubernetes runs it, a 3-node JetStream cluster configured by
`tidepool_runtime.nats_auth.cluster_config`, on loopback: the services' users of the manifests' NATS
StatefulSet, except that here they may create streams (on Kubernetes only the bus-init Job may:
tests/integration/test_k8s_bus_init.py), and routes log in with a password instead of the cluster's CA.

- every node's configuration passes `nats-server -t`;
- a stream with 3 replicas keeps every acknowledged message when its leader is killed with SIGKILL, and
  publishing resumes (the time it takes is printed, not asserted; the issue's bound is 10 s);
- a client without a login is refused; each service's login is refused what it must not use.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError

from tests.conftest import free_port, nats_binary, wait_for_port
from tests.polling import wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.access import API, SERVICE_ACCESS
from tidepool_runtime import nats_auth
from tidepool_runtime.broker import Bus, connect
from tidepool_runtime.process import die_with_parent

NODES = 3


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    config: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [nats_binary(), "-c", str(self.config)],
            env={**os.environ, "POD_NAME": self.name},
            stdout=subprocess.DEVNULL,
            stderr=self.config.with_suffix(".log").open("w"),
            preexec_fn=die_with_parent,
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class Cluster:
    nodes: list[Node]
    passwords: dict[str, str]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    async def login(self, service: str, **options: Any) -> Client:
        return await nats.connect(
            self.urls,
            user=service,
            password=self.passwords[service],
            inbox_prefix=nats_auth.inbox_prefix(service),
            connect_timeout=3,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            **options,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("nats-cluster")
    passwords = nats_auth.new_passwords()
    hashes = {service: nats_auth.hash_password(password) for service, password in passwords.items()}
    route_password = secrets.token_urlsafe(24)
    nodes = [
        Node(f"nats-{index}", free_port(), free_port(), folder / f"nats-{index}.json")
        for index in range(NODES)
    ]
    routes = [f"nats-route://127.0.0.1:{node.cluster_port}" for node in nodes]
    for node in nodes:
        # As in a StatefulSet, the node's name comes from its environment (the pod name); the rest differs
        # only by ports here because all nodes share one host.
        node.config.write_text(
            nats_auth.cluster_config(
                hashes,
                server_name="$POD_NAME",
                routes=routes,
                route_user="route",
                route_password=route_password,
                host="127.0.0.1",
                port=node.port,
                cluster_host="127.0.0.1",
                cluster_port=node.cluster_port,
                monitor_port=0,
                store_dir=str(folder / node.name),
            )
        )
        checked = subprocess.run(
            [nats_binary(), "-t", "-c", str(node.config)],
            env={**os.environ, "POD_NAME": node.name},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            wait_for_port(node.port)
        yield Cluster(nodes, passwords)
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[Client]:
    client = await cluster.login("api")
    try:
        yield client
    finally:
        await client.close()


async def test_a_replicated_stream_keeps_acknowledged_messages_when_its_leader_is_killed(
    cluster: Cluster, api: Client
) -> None:
    js = api.jetstream(timeout=2)

    async def jetstream_ready() -> bool:
        try:
            await js.account_info()
        except Exception:
            return False
        return True

    await wait_until_async(jetstream_ready, "the cluster never elected a JetStream leader", timeout=60)
    stream = channels.SANDBOX_INTENTS.stream
    assert stream is not None

    async def declared() -> Bus | None:
        # As the API declares its streams and buckets at start, with TIDEPOOL_NATS_REPLICAS=3.
        try:
            return await connect(
                cluster.urls[0],
                "cluster-api",
                access=API,
                replicas=NODES,
                user="api",
                password=cluster.passwords["api"],
            )
        except Exception:
            return None

    service_bus = await wait_until_async(declared, "the API could not declare its topology", timeout=60)
    await service_bus.close()
    bucket = await js.stream_info(nats_auth.kv_stream(channels.DESIRED))
    assert bucket.config.num_replicas == NODES
    info = await js.stream_info(stream.name)
    assert info.config.num_replicas == NODES
    acked: list[str] = []

    async def publish(marker: str) -> None:
        subject = channels.SANDBOX_INTENTS.address(sandbox_id=marker)
        await js.publish(subject, marker.encode(), timeout=1)
        acked.append(marker)

    for index in range(100):
        await publish(f"before-{index}")

    async def stream_leader() -> str | None:
        """The stream's leader, once it has one and its replicas are known."""
        try:
            cluster_info = (await js.stream_info(stream.name)).cluster
        except Exception:
            return None
        if cluster_info is None or not cluster_info.leader or not cluster_info.replicas:
            return None
        return cluster_info.leader

    leader = await wait_until_async(stream_leader, "no stream leader with replicas", timeout=60)
    victim = next(node for node in cluster.nodes if node.name == leader)
    victim.kill()
    killed = time.monotonic()

    async def publish_again() -> bool:
        try:
            await publish(f"after-{uuid.uuid4().hex[:8]}")
        except Exception:
            return False
        return True

    await wait_until_async(publish_again, "publishing never resumed after the leader died", timeout=60)
    print(
        f"\npublishing resumed {time.monotonic() - killed:.2f} s after SIGKILL of the stream leader {leader}"
    )
    new_leader = await wait_until_async(stream_leader, "no new stream leader", timeout=60)
    assert new_leader != leader

    # Every acknowledged message is there, read back through another service's login (the scheduler's).
    scheduler = await cluster.login("scheduler")
    try:
        sjs = scheduler.jetstream(timeout=5)

        async def subscribed() -> Any:
            # The metadata leader may be the node just killed: consumers wait for the next one.
            try:
                return await sjs.pull_subscribe(
                    channels.SANDBOX_INTENTS.filter, durable="cluster-test", stream=stream.name
                )
            except (TimeoutError, NatsError):
                return None

        subscription = await wait_until_async(subscribed, "no consumer could be made", timeout=60)
        received: list[str] = []

        async def all_received() -> bool:
            try:
                for message in await subscription.fetch(200, timeout=1):
                    received.append(message.data.decode())
                    await message.ack()
            except (TimeoutError, NatsError):
                pass
            return set(acked) <= set(received)

        await wait_until_async(all_received, lambda: f"lost: {sorted(set(acked) - set(received))[:10]}")
        await subscription.unsubscribe()
    finally:
        await scheduler.close()
        victim.start()  # the cluster whole again for the other tests
        wait_for_port(victim.port)


async def test_a_client_without_a_login_is_refused(cluster: Cluster) -> None:
    for login in ({}, {"user": "api", "password": "wrong"}, {"user": "route", "password": "x"}):
        with pytest.raises((NoServersError, NatsError, OSError)):
            await nats.connect(cluster.urls[0], allow_reconnect=False, connect_timeout=3, **login)


# For each service: a subject it must neither publish on nor subscribe to.
FORBIDDEN = {
    "api": (
        channels.RUNNER_JOBS.address(runner_id="r1"),
        channels.SANDBOX_INTENTS.subject.split("{")[0] + "x",
    ),
    "scheduler": (channels.BUILD_JOBS.subject, "$KV.tidepool_api_keys.>"),
    "builder": (channels.SANDBOX_INTENTS.address(sandbox_id="x"), "$KV.tidepool_routes.>"),
    "runner": (channels.SANDBOX_INTENTS.address(sandbox_id="x"), "$KV.tidepool_api_keys.>"),
    "proxy": (channels.SANDBOX_INTENTS.address(sandbox_id="x"), "$KV.tidepool_signing_keys.>"),
    "ssh_gateway": (channels.RUNNER_JOBS.address(runner_id="r1"), "$KV.tidepool_ssh_access.>"),
    "telemetry": (channels.SANDBOX_EVENTS.address(sandbox_id="x"), "_INBOX_api.>"),
}


@pytest.mark.parametrize("service", sorted(SERVICE_ACCESS))
async def test_each_service_is_denied_what_it_must_not_use(cluster: Cluster, service: str) -> None:
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error).lower())

    publish, subscribe = FORBIDDEN[service]
    client = await cluster.login(service, error_cb=on_error)
    try:
        await client.publish(publish, b"x")
        await client.subscribe(subscribe)
        await client.flush()
        for kind, subject in (("publish", publish), ("subscription", subscribe)):
            refusal = f'permissions violation for {kind} to "{subject.lower()}"'
            await wait_until_async(
                lambda r=refusal: any(r in error for error in errors),
                f"{service} was not refused {kind} on {subject}: {errors}",
                timeout=10,
            )
        # And what it may do still works (the login is not simply refused everything): a JetStream request
        # answered on its own inbox, with no new refusal.
        refusals = len(errors)
        answer = await client.request("$JS.API.INFO", b"", timeout=5)
        assert b'"type":"io.nats.jetstream.api.v1.account_info_response"' in answer.data, answer.data
        await client.flush()
        assert len(errors) == refusals, errors[refusals:]
    finally:
        await client.close()
