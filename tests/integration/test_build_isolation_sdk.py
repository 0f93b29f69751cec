"""Issue #7: a tenant's snapshot build runs its RUN steps confined like a sandbox, through the official SDK.

A fresh organization builds a declarative `Image` whose RUN steps record what they could see and do into
`/opt/evidence` (their uid map, capabilities, cgroup and process limits, and how connections to the host,
the control plane and the metadata address ended), then a sandbox from that snapshot reads the evidence.
On main, RUN steps ran in the host's network namespace with the default capabilities and no limits (the
capability, network and bounds tests fail there). A package install through the TLS-intercepting proxy
(the injected CA bundle) must keep working.

RUN steps run in a user namespace of their own (the stack's build engine): their root is not the host's, and
the image they build is still right (owners, writes to `/`, deletions: what Podman 4.3.1 gets wrong in user
namespace builds on its own; tidepool_stack.build_runtime).

Only this host's own addresses, loopback and 169.254.169.254 are targeted.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    Daytona,
    DaytonaConfig,
    DaytonaError,
    Image,
)

from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.netprobe import BLOCKED_TCP, PROBE, SERVER
from tests.integration.stackthread import StackThread
from tidepool_runtime.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]
# Capability bits (linux/capability.h) a build step's root must not hold.
FORBIDDEN_CAPABILITIES = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_MODULE": 16, "SYS_ADMIN": 21, "MKNOD": 27}
HOST_ROOT_UID_MAP = ["0", "0", "4294967295"]
# A hang detector, not a threshold: blocked connections are refused at once.
PROBE_TIMEOUT_SECONDS = 20
# Tasks a build step tries to start beyond the build's process limit.
TASK_MARGIN = 256
BUILD_USER_UID = 1234

# Runs in a RUN step (any python3, stdlib only): records the evidence; never fails the step itself.
EVIDENCE = r"""
import json, os, socket, subprocess, sys
out = "/opt/evidence"
os.makedirs(out, exist_ok=True)
def write(name, text):
    with open(os.path.join(out, name), "w") as f:
        f.write(text)
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as error:
        return f"unreadable: {error}"
write("uid_map", read("/proc/self/uid_map"))
write("status", read("/proc/self/status"))
import resource
write("nproc", str(resource.getrlimit(resource.RLIMIT_NPROC)[0]))
v1 = os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes")
memory = "/sys/fs/cgroup/memory/memory.limit_in_bytes" if v1 else "/sys/fs/cgroup/memory.max"
write("memory_limit", read(memory))
write("cpu_quota", read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") + read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
      if v1 else read("/sys/fs/cgroup/cpu.max"))
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    write("raw_socket", "ok")
except OSError as error:
    write("raw_socket", f"blocked: {error}")
try:
    os.mknod("/tmp/evidence-null", 0o600 | 0o020000, os.makedev(1, 3))
    write("mknod", "ok")
except OSError as error:
    write("mknod", f"blocked: {error}")
# Tasks (threads count) until the kernel refuses one, at most the build's limit plus a margin.
import threading
threading.stack_size(64 * 1024)
stop, threads = threading.Event(), []
try:
    while len(threads) < int(sys.argv[4]):
        thread = threading.Thread(target=stop.wait, daemon=True)
        thread.start()
        threads.append(thread)
except RuntimeError:
    pass
stop.set()
for thread in threads:
    thread.join()
write("tasks", str(len(threads)))
write("cgroup", read("/proc/self/cgroup"))
probe = subprocess.run([sys.executable, *sys.argv[1:4]], capture_output=True, text=True)
write("probes", json.dumps({"targets": json.loads(sys.argv[2]), "results": probe.stdout.strip(),
                            "error": probe.stderr}))
"""


def uplink_address() -> str:
    """The host's address on its default route (eth0 here)."""
    route = subprocess.run(["ip", "-j", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True)
    return str(json.loads(route.stdout)[0]["prefsrc"])


def probe_from_host(*targets: tuple[str, str, int]) -> list[str]:
    argv = [sys.executable, "-c", PROBE, json.dumps(targets), str(PROBE_TIMEOUT_SECONDS)]
    return list(json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout))


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """A server of the test's own on every host address (0.0.0.0), answering "ok"."""
    with socket.socket() as probe_socket:
        probe_socket.bind(("0.0.0.0", 0))
        port = int(probe_socket.getsockname()[1])
    argv = [sys.executable, "-c", SERVER, json.dumps([("tcp", "0.0.0.0", port)])]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield port
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def tenant(stack: StackThread) -> Daytona:
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"builder-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    return Daytona(DaytonaConfig(api_key=created.json()["apiKey"]["value"], api_url=stack.api_url))


def cleanup(action: Callable[[], object]) -> None:
    """Best effort: the evidence is read by then, and what is under test here is the build. (Podman 4.3.1
    sometimes refuses to remove a container whose shm mount its own cleanup still holds.)"""
    try:
        action()
    except DaytonaError as error:
        warnings.warn(f"cleanup failed: {error}", stacklevel=2)


def control_plane_ports(stack: StackThread, host_server: int) -> list[int]:
    env = stack.stack.env
    ports = [
        stack.config.api_port,
        stack.config.proxy_port,
        int(env["TIDEPOOL_RUNNER_PORT"]),
        int(urlsplit(env["TIDEPOOL_NATS_URL"]).port or 0),
        int(urlsplit(env["TIDEPOOL_S3_ENDPOINT"]).port or 0),
        host_server,
    ]
    if env.get("TIDEPOOL_REGISTRY_URL"):
        ports.append(int(env["TIDEPOOL_REGISTRY_URL"].rsplit(":", 1)[1]))
    return [port for port in ports if port]


@pytest.fixture(scope="module")
def evidence(
    stack: StackThread, tenant: Daytona, host_server: int, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Builds the evidence image as the tenant and reads what its RUN steps recorded, from a sandbox."""
    uplink = uplink_address()
    # Only the firewall (and the namespaces) stand between a build step and this server.
    assert probe_from_host(("tcp", uplink, host_server)) == ["ok"]
    # The host as a build step would find it: the sandbox bridge's gateway, eth0, and loopback (the host's
    # own when a step shares the host's network namespace).
    bridge_gateway = str(next(ipaddress.ip_network(SETTINGS.sandbox_network_subnet).hosts()))
    hosts = (bridge_gateway, uplink, "127.0.0.1")
    targets = [("connect", host, port) for port in control_plane_ports(stack, host_server) for host in hosts]
    targets.append(("connect", "169.254.169.254", 80))
    context = tmp_path_factory.mktemp("evidence")
    (context / "evidence.py").write_text(EVIDENCE)
    (context / "netprobe.py").write_text(PROBE)
    marker = f"build-isolation-{uuid.uuid4().hex[:8]}"
    image = (
        Image.base(ensure_python_slim_stand_in())
        .add_local_file(context / "evidence.py", "/opt/evidence-tools/evidence.py")
        .add_local_file(context / "netprobe.py", "/opt/evidence-tools/netprobe.py")
        .run_commands(
            f"echo {marker} && python3 /opt/evidence-tools/evidence.py /opt/evidence-tools/netprobe.py "
            f"{shlex.quote(json.dumps(targets))} {PROBE_TIMEOUT_SECONDS} {SETTINGS.build_pids + TASK_MARGIN}",
            # A package install through the TLS-intercepting proxy: the injected CA bundle is trusted.
            "pip install --no-cache-dir six > /opt/evidence/pip.log 2>&1 && python3 -c 'import six' "
            "&& echo installed >> /opt/evidence/pip.log",
            # What a build in a user namespace must still get right: `/` is writable, a user's files keep
            # their owner, files of an earlier step can be deleted.
            f"mkdir /{marker} && useradd -m -u {BUILD_USER_UID} builder-user && mkdir /{marker}/owned "
            f"&& chown builder-user:builder-user /{marker}/owned && touch /{marker}/deleted /etc/{marker}",
            f"rm /{marker}/deleted /etc/{marker} && rm -rf /usr/share/doc",
        )
    )
    logs: list[str] = []
    name = f"build-isolation-{uuid.uuid4().hex[:8]}"
    snapshot = tenant.snapshot.create(CreateSnapshotParams(name=name, image=image), on_logs=logs.append)
    try:
        assert snapshot.state == "active"
        sandbox = tenant.create(CreateSandboxFromSnapshotParams(snapshot=name), timeout=300)
        try:
            items = (
                "uid_map",
                "status",
                "nproc",
                "memory_limit",
                "cpu_quota",
                "raw_socket",
                "mknod",
                "probes",
                "tasks",
                "cgroup",
            )
            found = {item: sandbox.fs.download_file(f"/opt/evidence/{item}").decode() for item in items}
            found["pip"] = sandbox.fs.download_file("/opt/evidence/pip.log").decode()
            found["built"] = sandbox.process.exec(
                f"stat -c '%u:%g %n' /{marker} /{marker}/owned /home/builder-user; "
                f"ls -A /{marker}; ls -d /etc/{marker} /usr/share/doc 2>&1; true"
            ).result
        finally:
            cleanup(lambda: tenant.delete(sandbox))
    finally:
        cleanup(lambda: tenant.snapshot.delete(snapshot))
    found["logs"] = "\n".join(logs)
    found["marker"] = marker
    found["targets"] = json.dumps(targets)
    return found


def test_build_steps_do_not_run_as_the_hosts_root(
    stack: StackThread, evidence: dict[str, str], request: pytest.FixtureRequest
) -> None:
    if not stack.stack.build_engine_env:
        # Strict: it turns into a failure as soon as builds do run in a user namespace, to be un-marked then.
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="the build engine is off (TIDEPOOL_BUILD_ENGINE): its per-step chowned copies cost "
                "~9 GB per default-image build, more disk than several stacks on this machine have",
            )
        )
    uid_map = [line.split() for line in evidence["uid_map"].strip().splitlines()]
    assert uid_map and uid_map[0] != HOST_ROOT_UID_MAP, f"RUN steps ran as the host's root: {uid_map}"
    assert len(uid_map) == 1 and uid_map[0][0] == "0" and uid_map[0][1] != "0", uid_map
    assert int(uid_map[0][2]) <= 65536, uid_map
    # RLIMIT_NPROC binds root only inside a user namespace: then it bounds the build's processes.
    assert int(evidence["nproc"].strip()) == SETTINGS.build_pids, evidence["nproc"]


def test_an_image_built_in_a_user_namespace_keeps_owners_and_deletions(evidence: dict[str, str]) -> None:
    marker = evidence["marker"]
    lines = evidence["built"].splitlines()
    assert lines[:3] == [
        f"0:0 /{marker}",
        f"{BUILD_USER_UID}:{BUILD_USER_UID} /{marker}/owned",
        f"{BUILD_USER_UID}:{BUILD_USER_UID} /home/builder-user",
    ], evidence["built"]
    assert lines[3] == "owned", evidence["built"]  # `deleted` is gone
    assert "No such file or directory" in lines[4] and f"/etc/{marker}" in lines[4], evidence["built"]
    assert "No such file or directory" in lines[5] and "/usr/share/doc" in lines[5], evidence["built"]


def test_build_steps_hold_only_the_sandbox_capabilities(evidence: dict[str, str]) -> None:
    cap_eff = next(line for line in evidence["status"].splitlines() if line.startswith("CapEff:"))
    bits = int(cap_eff.split()[1], 16)
    held = sorted(name for name, bit in FORBIDDEN_CAPABILITIES.items() if bits & (1 << bit))
    assert held == [], f"build step root holds {held} ({cap_eff})"
    assert evidence["raw_socket"].startswith("blocked"), evidence["raw_socket"]
    assert evidence["mknod"].startswith("blocked"), evidence["mknod"]


def test_build_steps_reach_neither_the_host_nor_the_control_plane_nor_metadata(
    evidence: dict[str, str],
) -> None:
    # NATS, the API, the proxy, the runner, S3, the registry and a host port; 169.254.169.254: all refused.
    targets = json.loads(evidence["targets"])
    probes = json.loads(evidence["probes"])
    results = json.loads(probes["results"] or "null")
    assert results == [BLOCKED_TCP] * len(targets), probes


def test_a_build_is_bounded_in_processes(evidence: dict[str, str]) -> None:
    # Its own cgroup's pids.max (the kernel exempts the host's uid 0 from RLIMIT_NPROC).
    assert 0 < int(evidence["tasks"]) < SETTINGS.build_pids, (evidence["tasks"], evidence["cgroup"])


def test_build_steps_are_bounded_in_memory_and_cpu(evidence: dict[str, str]) -> None:
    memory_limit = evidence["memory_limit"].strip()
    assert memory_limit.isdigit() and int(memory_limit) <= SETTINGS.build_memory_gib * 1024**3, memory_limit
    quota, period = (int(value) for value in evidence["cpu_quota"].split()[:2])
    assert 0 < quota <= SETTINGS.build_cpu * period, evidence["cpu_quota"]


def test_build_steps_still_install_packages_and_stream_logs(evidence: dict[str, str]) -> None:
    assert evidence["pip"].strip().endswith("installed"), evidence["pip"]
    assert evidence["marker"] in evidence["logs"], "build logs stream while building"
