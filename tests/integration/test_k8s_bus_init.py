"""The bus-init Job of deploy/k8s (tidepool_stack.bus_init) on a real nats-server with the Kubernetes users:
`bus_init`'s rights (tidepool_stack.k8s_nats) suffice to create every stream and bucket, a re-run changes
nothing, and the API declaring its topology afterwards keeps the streams' replica count (here one node, so
one replica; the three-node cluster is the runtime's test). With deploy/k8s's own users (nats.conf), services
started as deploy/k8s configures them (TIDEPOOL_BUS_CREATE_STREAMS=false) bind to what bus-init made, fail
to start before it ran, and none may create a stream or bucket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from tests.conftest import die_with_parent, free_port, nats_binary, wait_for_port, watch_server
from tests.integration.test_nats_auth import Raw
from tests.polling import wait_until
from tidepool_contracts.access import SERVICE_ACCESS
from tidepool_contracts.channels import BUCKETS, STREAMS
from tidepool_runtime import nats_auth
from tidepool_runtime.broker import Bus, MissingTopologyError, create_broker, declare_topology
from tidepool_runtime.settings import CommonSettings
from tidepool_stack import k8s_bootstrap, k8s_nats
from tidepool_stack.bus_init import init_bus
from tidepool_telemetry.samples import apply_retention

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


async def streams_and_buckets(url: str, password: str = PASSWORD["bus_init"]) -> dict[str, int]:
    """Stream (KV buckets: their stream) -> replicas, as bus_init, the one user that may inspect them all."""
    nc = await nats.connect(url, user="bus_init", password=password, inbox_prefix=b"_INBOX_bus_init")
    try:
        js = nc.jetstream()
        names = [stream.name for stream in STREAMS] + [nats_auth.kv_stream(bucket) for bucket in BUCKETS]
        return {name: (await js.stream_info(name)).config.num_replicas for name in names}
    finally:
        await nc.close()


async def every_stream(url: str, password: str) -> set[str]:
    """The names of all streams on the server (KV buckets included), listed as bus_init."""
    nc = await nats.connect(url, user="bus_init", password=password, inbox_prefix=b"_INBOX_bus_init")
    try:
        return {stream.config.name for stream in await nc.jetstream().streams_info()}
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


@pytest.fixture
def cluster_users_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """nats-server with deploy/k8s's users and permissions (k8s_nats.render, the checked-in nats.conf) and
    the bootstrap's hashes, one node in clear (TLS and routes are test_nats_auth's and test_nats_cluster's):
    (url, NATS user -> password)."""
    made = k8s_bootstrap.plan({}, postgres=False, registry=False)
    passwords = {
        data["TIDEPOOL_NATS_USER"]: data["TIDEPOOL_NATS_PASSWORD"]
        for data in made.values()
        if "TIDEPOOL_NATS_USER" in data
    }
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "hashes.conf").write_text(
        made[(k8s_bootstrap.CONTROL, "tidepool-nats-users")]["hashes.conf"]
    )
    port = free_port()
    text = k8s_nats.render()
    text = text.replace(f'"port": {k8s_nats.CLIENT_PORT},', f'"port": {port},', 1)
    text = text.replace(f'"http_port": {k8s_nats.MONITOR_PORT},', f'"http_port": {free_port()},')
    text = text.replace('"/data/jetstream"', json.dumps(str(tmp_path / "store")))
    text = text.replace('"/var/run/nats/nats.pid"', json.dumps(str(tmp_path / "nats.pid")))
    for block in ("tls", "cluster"):
        text, dropped = re.subn(rf'\n  "{block}": \{{.*?\n  \}},', "", text, count=1, flags=re.S)
        assert dropped == 1, block
    (tmp_path / "nats.conf").write_text(text)
    process = subprocess.Popen(
        [nats_binary(), "-c", str(tmp_path / "nats.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
        env={"POD_NAME": "nats-0"},
    )
    stop_watching = watch_server(process, "nats-server (deploy/k8s users)")
    try:
        wait_for_port(port)
        yield f"nats://127.0.0.1:{port}", passwords
    finally:
        stop_watching()
        process.terminate()
        process.wait(timeout=10)


def service_settings(
    settings_type: type[CommonSettings], url: str, user: str, password: str
) -> CommonSettings:
    """A service's settings as deploy/k8s gives them (ConfigMap tidepool-common, its Secret)."""
    return settings_type(
        nats_url=url, nats_user=user, nats_password=password, nats_replicas=3, bus_create_streams=False
    )


async def test_services_start_on_bus_init_streams_and_cannot_create_one(
    cluster_users_server: tuple[str, dict[str, str]],
) -> None:
    url, passwords = cluster_users_server
    # Before bus-init: a service neither creates its streams nor starts without them.
    early = Bus(
        create_broker(url, "api", user="api", password=passwords["api"]),
        access=SERVICE_ACCESS["api"],
        create_streams=False,
    )
    with pytest.raises(MissingTopologyError):
        await early.connect()
    await early.close()
    await init_bus(CommonSettings(nats_url=url, nats_user="bus_init", nats_password=passwords["bus_init"]), 1)
    before = await every_stream(url, passwords["bus_init"])
    assert set(await streams_and_buckets(url, passwords["bus_init"])) <= before
    opened = []
    try:
        for service, access in SERVICE_ACCESS.items():
            settings = service_settings(CommonSettings, url, service, passwords[service])
            bus = Bus(
                create_broker(url, service, **settings.nats_login),
                access=access,
                replicas=settings.nats_replicas,
                create_streams=settings.bus_create_streams,
            )
            await bus.connect()  # binds to bus-init's streams and buckets
            opened.append(bus)
            for bucket in access.buckets:
                await bus.kv(bucket)
        # The telemetry service still tunes the one stream it owns the limits of.
        (telemetry,) = [bus for bus in opened if bus.access is SERVICE_ACCESS["telemetry"]]
        await apply_retention(telemetry, 3600.0)
    finally:
        for bus in opened:
            await bus.close()
    for service in SERVICE_ACCESS:
        raw = Raw()
        nc = await raw.open(url, user=service, password=passwords[service])
        try:
            js = nc.jetstream(timeout=0.25)  # the refusal comes as an error, never as an answer
            for name in ("ROGUE", STREAMS[0].name, nats_auth.kv_stream(BUCKETS[0])):
                with contextlib.suppress(NatsTimeoutError):  # refused: no answer comes
                    await js.add_stream(name=name, subjects=[f"rogue.{service}.{name}"])
                await raw.denied(f"$JS.API.STREAM.CREATE.{name}")
            with contextlib.suppress(NatsTimeoutError):
                await js.create_key_value(bucket=f"rogue_{service}")
            await raw.denied(f"$JS.API.STREAM.CREATE.KV_rogue_{service}")
        finally:
            await nc.close()
    after = await every_stream(url, passwords["bus_init"])
    assert after == before, f"a service created {sorted(after - before)}"
    assert "ROGUE" not in after and not any(name.startswith("KV_rogue_") for name in after)


def start_service(module: str, url: str, password: str, tmp_path: Path, health_port: int) -> subprocess.Popen:
    """`python -m <module>` with the environment deploy/k8s gives it (tidepool-common, its NATS Secret)."""
    user = module.removeprefix("tidepool_")
    environment = {
        **os.environ,
        "TIDEPOOL_NATS_URL": url,
        "TIDEPOOL_NATS_USER": user,
        "TIDEPOOL_NATS_PASSWORD": password,
        "TIDEPOOL_NATS_REPLICAS": "3",
        "TIDEPOOL_BUS_CREATE_STREAMS": "false",
        "TIDEPOOL_HEALTH_HOST": "127.0.0.1",
        "TIDEPOOL_HEALTH_PORT": str(health_port),
        "TIDEPOOL_DATA_DIR": str(tmp_path / user),
    }
    return subprocess.Popen(
        [sys.executable, "-m", module],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / f"{user}.log").open("w"),
        preexec_fn=die_with_parent,
    )


RESTARTS = 2


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_service_processes_wait_for_bus_init_then_start_on_its_streams(
    cluster_users_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """The scheduler and telemetry (which tunes its samples stream) as processes, configured as deploy/k8s
    configures them: before bus-init they exit (Kubernetes restarts them), after it they become ready."""
    url, passwords = cluster_users_server
    modules = ("tidepool_scheduler", "tidepool_telemetry")
    early = start_service("tidepool_scheduler", url, passwords["scheduler"], tmp_path, free_port())
    try:
        assert early.wait(timeout=60) != 0
    finally:
        early.kill()
    assert "MissingTopologyError" in (tmp_path / "scheduler.log").read_text()
    asyncio.run(
        init_bus(CommonSettings(nats_url=url, nats_user="bus_init", nats_password=passwords["bus_init"]), 1)
    )
    ports = {module: free_port() for module in modules}
    processes: dict[str, subprocess.Popen] = {}

    def up(module: str) -> bool:
        """Ready; a process that exited is started again, as Kubernetes does (on a loaded machine a NATS
        request at start may time out), at most `RESTARTS` times."""
        process = processes.get(module)
        if process is None or process.poll() is not None:
            starts[module] += 1
            assert starts[module] <= 1 + RESTARTS, f"{module} keeps exiting: {log(module)}"
            user = module.removeprefix("tidepool_")
            processes[module] = start_service(module, url, passwords[user], tmp_path, ports[module])
            return False
        return ready(ports[module])

    def log(module: str) -> str:
        return (tmp_path / f"{module.removeprefix('tidepool_')}.log").read_text()[-2000:]

    starts = dict.fromkeys(modules, 0)
    try:
        for module in modules:
            wait_until(
                lambda module=module: up(module),
                lambda module=module: f"{module} never became ready: {log(module)}",
                timeout=180,  # process starts, on a loaded machine
            )
            assert "MissingTopologyError" not in log(module)
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
