"""The real runner against real Podman (Docker-compatible API) and the real daemon, over a private NATS.

Everything is started here: nats-server, `podman system service` on a temp socket, the runner in-process.
Containers are named `tidepool-<sandbox id>` and removed at the end even when a test fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import watch_server
from tests.integration.stackthread import release_sandboxes
from tests.polling import wait_until, wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.models import (
    ApiKeyRecord,
    RunnerInfo,
    RunnerJob,
    SandboxAction,
    SandboxRoute,
    SandboxSpec,
)
from tidepool_contracts.states import SandboxState
from tidepool_contracts.subjects import event_sandbox
from tidepool_proxy.app import create_proxy_app
from tidepool_runner.engine import ContainerEngine
from tidepool_runner.main import Runner
from tidepool_runner.network import SandboxNetworkError
from tidepool_runtime.broker import Bus, connect, kv_delete, kv_get, kv_put
from tidepool_runtime.process import die_with_parent
from tidepool_runtime.settings import REPO_ROOT, Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]

DEFAULT_IMAGE = Settings(_env_file=None).default_image
BASE_IMAGE = "localhost/tidepool/base:bookworm"
TEST_IMAGE = "localhost/tidepool/test-python:1"
CONTAINERS_CONF = REPO_ROOT / "deploy" / "podman" / "containers.conf"
REAL_DAEMON_DIR = REPO_ROOT / "services" / "daemon"
RUNNER_TOKEN = "integration-runner-token"
EVENT_TIMEOUT = 90.0

# Used only until the real daemon exists: answers GET /version on the socket, nothing else.
STUB_DAEMON = """
import argparse, http.server, json, os, socketserver
parser = argparse.ArgumentParser(); parser.add_argument("--socket"); args = parser.parse_args()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def address_string(self): return "unix"
    def do_GET(self):
        body = json.dumps({"version": "stub"}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer): daemon_threads = True
if os.path.exists(args.socket): os.unlink(args.socket)
Server(args.socket, Handler).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    if CONTAINERS_CONF.exists():
        env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return env


def image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=podman_env(), check=False).returncode == 0


def sandbox_image() -> str:
    """The platform's default image when built; else a minimal python3 image on top of the base image."""
    if image_exists(DEFAULT_IMAGE):
        return DEFAULT_IMAGE
    if image_exists(TEST_IMAGE):
        return TEST_IMAGE
    if not image_exists(BASE_IMAGE):
        pytest.skip(f"neither {DEFAULT_IMAGE} nor {BASE_IMAGE} is built")
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Containerfile").write_text(
            f"FROM {BASE_IMAGE}\n"
            "RUN apt-get update && apt-get install -y --no-install-recommends python3 "
            "&& rm -rf /var/lib/apt/lists/* && useradd -m daytona\n"
        )
        subprocess.run(["podman", "build", "-t", TEST_IMAGE, context], env=podman_env(), check=True)
    return TEST_IMAGE


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    # Short on purpose: <data_dir>/sockets/<uuid>/toolbox.sock must fit a unix socket path (107 bytes).
    path = Path(tempfile.mkdtemp(prefix="tpr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def nats_url(work_dir: Path) -> Iterator[str]:
    binary = Path(sys.executable).parent / "nats-server"
    port = free_port()
    process = subprocess.Popen(
        [str(binary), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(work_dir / "nats")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,  # gone with pytest, even if pytest is killed
    )
    stop_watching = watch_server(process, "nats-server")
    try:
        wait_for(lambda: port_open(port), "nats-server")
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_watching()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def podman_socket(work_dir: Path) -> Iterator[str]:
    socket_path = work_dir / "podman.sock"
    process = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env=podman_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(socket_path.exists, "podman service socket")
        yield f"unix://{socket_path}"
    finally:
        process.terminate()
        process.wait(timeout=20)


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    wait_until(condition, f"{what} did not come up within {timeout} s", timeout=timeout)


def daemon_dir(work_dir: Path) -> Path:
    if (REAL_DAEMON_DIR / "main.py").exists():
        return REAL_DAEMON_DIR
    stub = work_dir / "stub-daemon"
    stub.mkdir(exist_ok=True)
    (stub / "main.py").write_text(STUB_DAEMON)
    return stub


@dataclass
class Harness:
    settings: Settings
    runner: Runner
    bus: Bus
    docker: aiodocker.Docker
    http: aiohttp.ClientSession
    image: str
    sandbox_ids: list[str] = field(default_factory=list)

    def new_spec(self, **overrides: Any) -> SandboxSpec:
        sandbox_id = str(uuid.uuid4())
        self.sandbox_ids.append(sandbox_id)
        fields: dict[str, Any] = {
            "sandbox_id": sandbox_id,
            "organization_id": "org-integration",
            "image": self.image,
            "cpu": 1,
            "memory_gib": 1,
            "env": {"TIDEPOOL_TEST": "1"},
        }
        fields.update(overrides)
        return SandboxSpec.model_validate(fields)

    async def run_job(
        self, spec: SandboxSpec, action: SandboxAction, *, force: bool = False
    ) -> dict[str, Any]:
        """Publish a job like the scheduler does and return the first state event it produces."""
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def collect(msg: Any) -> None:
            await events.put(orjson.loads(msg.data))

        subscription = await self.bus.broker.connection.subscribe(event_sandbox(spec.sandbox_id), cb=collect)
        try:
            job = RunnerJob(
                intent_id=str(uuid.uuid4()), sandbox_id=spec.sandbox_id, action=action, spec=spec, force=force
            )
            await self.bus.publish(channels.RUNNER_JOBS, job, runner_id=self.runner.runner_id)
            return await asyncio.wait_for(events.get(), EVENT_TIMEOUT)
        finally:
            await subscription.unsubscribe()

    async def route(self, sandbox_id: str) -> SandboxRoute | None:
        return await kv_get(await self.bus.kv(channels.ROUTES), sandbox_id, SandboxRoute)

    async def container(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            container = await self.docker.containers.get(f"tidepool-{sandbox_id}")
        except aiodocker.DockerError as error:
            if error.status == 404:
                return None
            raise
        return container._container

    def toolbox_url(self, sandbox_id: str, path: str) -> str:
        return f"{self.settings.effective_runner_url}/sandboxes/{sandbox_id}/toolbox{path}"


@pytest.fixture(scope="module")
async def harness(work_dir: Path, nats_url: str, podman_socket: str) -> AsyncIterator[Harness]:
    image = sandbox_image()
    settings = Settings(
        data_dir=work_dir / "data",
        nats_url=nats_url,
        docker_host=podman_socket,
        daemon_dir=daemon_dir(work_dir),
        runner_id=f"runner-it-{uuid.uuid4().hex[:8]}",
        runner_port=free_port(),
        runner_token=RUNNER_TOKEN,
    )
    runner = Runner(settings)
    await runner.start()
    bus = await connect(nats_url, name="runner-integration-test", publishes=(channels.RUNNER_JOBS,))
    docker = aiodocker.Docker(url=podman_socket)
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {RUNNER_TOKEN}"})
    harness = Harness(settings=settings, runner=runner, bus=bus, docker=docker, http=http, image=image)
    try:
        yield harness
    finally:
        await harness.runner.stop()
        await http.close()
        release_sandboxes(settings.data_dir)
        await docker.close()
        await bus.close()


async def test_lifecycle_create_stop_start_destroy(harness: Harness) -> None:
    spec = harness.new_spec(cpu=2, memory_gib=2)
    sandbox_id = spec.sandbox_id

    started = await harness.run_job(spec, SandboxAction.CREATE)
    assert started["state"] == "started", started
    assert started["runner_id"] == harness.runner.runner_id
    assert started["daemon_version"]
    route = await harness.route(sandbox_id)
    assert route is not None
    assert (route.state, route.organization_id) == (SandboxState.STARTED, "org-integration")
    assert route.runner_url == harness.settings.effective_runner_url

    container = await harness.container(sandbox_id)
    assert container is not None
    host = container["HostConfig"]
    assert container["State"]["Running"] is True
    assert host["NanoCpus"] == 2_000_000_000
    assert host["Memory"] == 2 * 1024**3
    assert host["Privileged"] is False
    assert not host.get("PortBindings")
    assert container["Config"]["Labels"]["tidepool.sandbox"] == sandbox_id
    assert container["Config"]["Labels"]["tidepool.organization"] == "org-integration"
    assert container["Config"]["Entrypoint"][-2:] == ["--user", "daytona"]
    binds = host["Binds"]
    runtime = harness.settings.runtime_dir
    assert any(bind.startswith(f"{runtime}/daemon:/opt/tidepool/daemon:ro") for bind in binds)
    assert any(bind.startswith(f"{runtime}/sockets/{sandbox_id}:/run/tidepool:") for bind in binds)

    # Toolbox traffic through the runner's HTTP relay to the daemon's unix socket.
    async with harness.http.get(harness.toolbox_url(sandbox_id, "/version")) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["version"] == started["daemon_version"]
    async with harness.http.get(
        harness.toolbox_url(sandbox_id, "/version"), headers={"Authorization": ""}
    ) as response:
        assert response.status == 401

    # A redelivered CREATE converges on the same container.
    again = await harness.run_job(spec, SandboxAction.CREATE)
    assert again["state"] == "started"
    container_again = await harness.container(sandbox_id)
    assert container_again is not None and container_again["Id"] == container["Id"]

    stopped = await harness.run_job(spec, SandboxAction.STOP)
    assert stopped["state"] == "stopped", stopped
    container = await harness.container(sandbox_id)
    assert container is not None and container["State"]["Running"] is False
    route = await harness.route(sandbox_id)
    assert route is not None and route.state is SandboxState.STOPPED
    async with harness.http.get(harness.toolbox_url(sandbox_id, "/version")) as response:
        assert response.status == 502

    restarted = await harness.run_job(spec, SandboxAction.START)
    assert restarted["state"] == "started", restarted
    async with harness.http.get(harness.toolbox_url(sandbox_id, "/version")) as response:
        assert response.status == 200

    destroyed = await harness.run_job(spec, SandboxAction.DESTROY)
    assert destroyed["state"] == "destroyed", destroyed
    assert await harness.container(sandbox_id) is None
    assert await harness.route(sandbox_id) is None
    assert not (harness.settings.sockets_dir / sandbox_id).exists()


async def test_sandbox_runs_as_its_user_with_a_working_toolbox(harness: Harness) -> None:
    spec = harness.new_spec()
    started = await harness.run_job(spec, SandboxAction.CREATE)
    assert started["state"] == "started", started
    if harness.settings.daemon_dir != REAL_DAEMON_DIR:
        pytest.skip("the stub daemon only answers /version")
    url = harness.toolbox_url(spec.sandbox_id, "/process/execute")
    async with harness.http.post(url, json={"command": "id -un; pwd; echo $TIDEPOOL_TEST"}) as response:
        assert response.status == 200, await response.text()
        result = await response.json()
    assert result["result"].split() == ["daytona", "/home/daytona", "1"]
    await harness.run_job(spec, SandboxAction.DESTROY)


async def test_start_recreates_a_missing_container_and_stop_of_missing_is_error(harness: Harness) -> None:
    spec = harness.new_spec()
    started = await harness.run_job(spec, SandboxAction.START)
    assert started["state"] == "started", started
    # Through the runner's engine: it retries Podman's transient "device or resource busy" on removal.
    await ContainerEngine(harness.docker).remove(f"tidepool-{spec.sandbox_id}")
    missing = await harness.run_job(spec, SandboxAction.STOP)
    assert (missing["state"], missing["error_reason"]) == ("error", "container missing")
    recreated = await harness.run_job(spec, SandboxAction.START)
    assert recreated["state"] == "started", recreated
    await harness.run_job(spec, SandboxAction.DESTROY)


async def test_force_stop_kills(harness: Harness) -> None:
    spec = harness.new_spec()
    assert (await harness.run_job(spec, SandboxAction.CREATE))["state"] == "started"
    stopped = await harness.run_job(spec, SandboxAction.STOP, force=True)
    assert stopped["state"] == "stopped"
    container = await harness.container(spec.sandbox_id)
    # SIGKILL, not the graceful SIGTERM a plain stop sends (after which the daemon exits 0).
    assert container is not None and container["State"]["ExitCode"] == 137, container["State"]
    graceful = harness.new_spec()
    assert (await harness.run_job(graceful, SandboxAction.CREATE))["state"] == "started"
    assert (await harness.run_job(graceful, SandboxAction.STOP))["state"] == "stopped"
    container = await harness.container(graceful.sandbox_id)
    assert container is not None and container["State"]["ExitCode"] != 137, container["State"]
    await harness.run_job(spec, SandboxAction.DESTROY)
    await harness.run_job(graceful, SandboxAction.DESTROY)


async def test_bad_image_reports_error(harness: Harness) -> None:
    spec = harness.new_spec(image="localhost/tidepool/does-not-exist:0")
    failed = await harness.run_job(spec, SandboxAction.CREATE)
    assert failed["state"] == "error"
    assert failed["error_reason"] == "image localhost/tidepool/does-not-exist:0 not found"
    route = await harness.route(spec.sandbox_id)
    assert route is not None and route.state is SandboxState.ERROR
    assert await harness.container(spec.sandbox_id) is None


async def test_a_user_missing_from_the_image_is_created(harness: Harness) -> None:
    spec = harness.new_spec(os_user="agent")
    started = await harness.run_job(spec, SandboxAction.CREATE)
    assert started["state"] == "started", started
    if harness.settings.daemon_dir != REAL_DAEMON_DIR:
        pytest.skip("the stub daemon only answers /version")
    url = harness.toolbox_url(spec.sandbox_id, "/process/execute")
    async with harness.http.post(url, json={"command": "id -un; pwd; touch mine && echo ok"}) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["result"].split() == ["agent", "/home/agent", "ok"]
    await harness.run_job(spec, SandboxAction.DESTROY)


async def test_heartbeat_and_adoption_after_restart(harness: Harness) -> None:
    spec = harness.new_spec()
    assert (await harness.run_job(spec, SandboxAction.CREATE))["state"] == "started"
    runners = await harness.bus.kv(channels.RUNNERS)
    info = await kv_get(runners, harness.runner.runner_id, RunnerInfo)
    assert info is not None and info.url == harness.settings.effective_runner_url
    assert info.cpu_total == os.cpu_count()

    # A runner restart re-publishes the real state of the containers it finds.
    await kv_delete(await harness.bus.kv(channels.ROUTES), spec.sandbox_id)
    await harness.runner.stop()
    harness.runner = Runner(harness.settings)
    await harness.runner.start()
    # Adoption runs in the background, before jobs are consumed.
    route = await wait_until_async(lambda: harness.route(spec.sandbox_id), "no route after restart")
    assert route.state is SandboxState.STARTED

    async def counted() -> RunnerInfo | None:
        info = await kv_get(runners, harness.runner.runner_id, RunnerInfo)
        return info if info is not None and info.sandboxes_running >= 1 else None

    info = await wait_until_async(counted, "the runner never counted the adopted sandbox")
    assert info.cpu_allocated >= 1
    await harness.run_job(spec, SandboxAction.DESTROY)


async def test_blocked_network_sandbox_gets_a_chain_of_its_own_that_allows_nothing(harness: Harness) -> None:
    """networkBlockAll: the sandbox is on the sandbox network (so the policy can change without a restart)
    behind a chain of its own, keyed on its address, that accepts nothing, DNS included; gone with it."""
    spec = harness.new_spec(network_block_all=True)
    started = await harness.run_job(spec, SandboxAction.CREATE)
    assert started["state"] == "started", started
    container = await harness.container(spec.sandbox_id)
    assert container is not None
    networks = container["NetworkSettings"]["Networks"]
    assert list(networks) == [harness.settings.sandbox_network]
    address = networks[harness.settings.sandbox_network]["IPAddress"]

    def rules() -> list[str]:
        save = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True, check=True)
        return save.stdout.splitlines()

    dispatch = [line for line in rules() if f"tidepool sandbox {spec.sandbox_id}" in line]
    assert len(dispatch) == 1 and f"-s {address}/32" in dispatch[0], dispatch
    chain = dispatch[0].split()[-1]
    own = [line for line in rules() if line.startswith(f"-A {chain} ")]
    assert own and not any(line.endswith("-j ACCEPT") or line.endswith("-j RETURN") for line in own), own
    await harness.run_job(spec, SandboxAction.DESTROY)
    assert not [line for line in rules() if spec.sandbox_id in line or line.startswith(f"-A {chain} ")]


def firewall_jumps() -> dict[str, int]:
    """Jumps into the runner's firewall chains, per hook chain, over iptables and ip6tables."""
    counts: dict[str, int] = {}
    for save in ("iptables-save", "ip6tables-save"):
        table = subprocess.run([save, "-t", "filter"], capture_output=True, text=True, check=True).stdout
        for line in table.splitlines():
            parts = line.split()
            hook = parts[:1] == ["-A"] and parts[1] in ("INPUT", "FORWARD", "CNI-ADMIN")
            if hook and parts[-2] == "-j" and parts[-1].startswith("TIDEPOOL-"):
                key = f"{save.removesuffix('-save')} {parts[1]}"
                counts[key] = counts.get(key, 0) + 1
    return counts


async def test_sandbox_network_and_firewall_are_set_up_once_per_runner_start(harness: Harness) -> None:
    settings = harness.settings
    spec = harness.new_spec()
    assert (await harness.run_job(spec, SandboxAction.CREATE))["state"] == "started"
    container = await harness.container(spec.sandbox_id)
    assert container is not None
    # Podman reports NetworkMode "bridge" for any bridge network: the attached networks say which.
    networks = container["NetworkSettings"]["Networks"]
    assert list(networks) == [settings.sandbox_network]
    address = networks[settings.sandbox_network]["IPAddress"]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(settings.sandbox_network_subnet)

    expected = {
        f"{tool} {chain}": count
        for tool in ("iptables", "ip6tables")
        for chain, count in (("INPUT", 1), ("FORWARD", 2), ("CNI-ADMIN", 2))
    }
    assert firewall_jumps() == expected
    for _ in range(2):  # restarts re-apply the rules without adding jumps
        await harness.runner.stop()
        harness.runner = Runner(settings)
        await harness.runner.start()
    assert firewall_jumps() == expected
    await harness.run_job(spec, SandboxAction.DESTROY)


async def test_runner_refuses_a_network_its_firewall_cannot_protect(harness: Harness) -> None:
    """The engine's default network has another bridge: the runner must not start, rather than run
    sandboxes the firewall does not cover."""
    settings = harness.settings.model_copy(
        update={"sandbox_network": "podman", "runner_id": f"runner-it-{uuid.uuid4().hex[:8]}"}
    )
    runner = Runner(settings)
    try:
        with pytest.raises(SandboxNetworkError, match="exists with bridge"):
            await runner.start()
    finally:
        await runner.stop()


async def test_end_to_end_through_proxy_runner_and_daemon(harness: Harness) -> None:
    """SDK-shaped traffic: API key -> proxy -> runner -> unix socket -> daemon."""
    if harness.settings.daemon_dir != REAL_DAEMON_DIR:
        pytest.skip("needs the real daemon")
    spec = harness.new_spec()
    assert (await harness.run_job(spec, SandboxAction.CREATE))["state"] == "started"
    api_key = f"dtn_{uuid.uuid4().hex}"
    record = ApiKeyRecord(
        key_id="key-1", organization_id=spec.organization_id, permissions=("write:sandboxes",)
    )
    api_keys = await harness.bus.kv(channels.API_KEYS)
    await kv_put(api_keys, hashlib.sha256(api_key.encode()).hexdigest(), record)
    proxy = TestServer(create_proxy_app(harness.settings), host="127.0.0.1")
    await proxy.start_server()
    try:
        base = f"{str(proxy.make_url('')).rstrip('/')}/toolbox/{spec.sandbox_id}"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as sdk:
            async with sdk.post(f"{base}/process/execute", json={"command": "echo hi; exit 3"}) as response:
                assert response.status == 200, await response.text()
                result = await response.json()
            assert (result["result"].strip(), result["exitCode"]) == ("hi", 3)
            # Latency of this path is measured by `make bench`, not here.
            async with sdk.get(f"{base}/version") as response:
                assert response.status == 200
    finally:
        await proxy.close()
        await harness.run_job(spec, SandboxAction.DESTROY)
