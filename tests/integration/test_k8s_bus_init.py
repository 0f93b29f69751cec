"""The bus-init Job of deploy/k8s (tidepool_stack.bus_init) on a real nats-server with the Kubernetes users:
`bus_init`'s rights (tidepool_stack.k8s_nats) suffice to create every stream and bucket, a re-run changes
nothing, and the API declaring its topology afterwards keeps the streams' replica count (here one node, so
one replica; the three-node cluster is the runtime's test)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from tests.conftest import die_with_parent, free_port, nats_binary, wait_for_port, watch_server
from tidepool_contracts.access import SERVICE_ACCESS
from tidepool_contracts.channels import BUCKETS, STREAMS
from tidepool_runtime import nats_auth
from tidepool_runtime.broker import create_broker, declare_topology
from tidepool_runtime.settings import CommonSettings
from tidepool_stack import k8s_nats
from tidepool_stack.bus_init import init_bus

PASSWORD = {"bus_init": "bus-init-secret", "api": "api-secret"}


@pytest.fixture
def k8s_nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    users = [
        {
            "user": "bus_init",
            "password": nats_auth.hash_password(PASSWORD["bus_init"]),
            "permissions": k8s_nats.bus_init_permissions(),
        },
        {
            "user": "api",
            "password": nats_auth.hash_password(PASSWORD["api"]),
            **nats_auth.permissions_for("api"),
        },
    ]
    config = {
        "host": "127.0.0.1",
        "port": port,
        "jetstream": {"store_dir": str(tmp_path / "js")},
        "authorization": {"users": users},
    }
    (tmp_path / "nats.conf").write_text(json.dumps(config))
    process = subprocess.Popen(
        [nats_binary(), "-c", str(tmp_path / "nats.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    stop_watching = watch_server(process, "nats-server (k8s users)")
    try:
        wait_for_port(port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_watching()
        process.terminate()
        process.wait(timeout=10)


async def streams_and_buckets(url: str) -> dict[str, int]:
    """Stream (KV buckets: their stream) -> replicas, as bus_init, the one user that may inspect them all."""
    nc = await nats.connect(
        url, user="bus_init", password=PASSWORD["bus_init"], inbox_prefix=b"_INBOX_bus_init"
    )
    try:
        js = nc.jetstream()
        names = [stream.name for stream in STREAMS] + [nats_auth.kv_stream(bucket) for bucket in BUCKETS]
        return {name: (await js.stream_info(name)).config.num_replicas for name in names}
    finally:
        await nc.close()


async def test_bus_init_creates_everything_and_the_api_keeps_it(k8s_nats_url: str) -> None:
    settings = CommonSettings(nats_url=k8s_nats_url, nats_user="bus_init", nats_password=PASSWORD["bus_init"])
    await init_bus(settings, replicas=1)
    first = await streams_and_buckets(k8s_nats_url)
    assert set(first.values()) == {1}
    await init_bus(settings, replicas=1)  # idempotent
    broker = create_broker(k8s_nats_url, "api", user="api", password=PASSWORD["api"])
    await broker.connect()
    try:
        await declare_topology(broker, SERVICE_ACCESS["api"])
    finally:
        await broker.stop()
    assert await streams_and_buckets(k8s_nats_url) == first
