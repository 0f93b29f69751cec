"""Sandbox network isolation end to end through the official SDK (daytona==0.226.1) against a real stack:
sandboxes reach neither each other, nor the host, nor the control plane, nor link-local/private addresses,
and blocked connections fail at once (refused), never by timing out; DNS and the internet keep working.

Only loopback, this host's own addresses and the sandboxes the test creates are targeted.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from daytona import Daytona, Sandbox, SessionExecuteRequest

from tests.integration.netprobe import BLOCKED_TCP, PROBE, SERVER
from tests.integration.stackthread import StackThread
from tests.polling import wait_until
from tidepool_runtime.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

PROBE_PATH = "/tmp/netprobe.py"
# A hang detector, not a threshold: blocked connections must be refused, so they never get near it.
PROBE_TIMEOUT_SECONDS = 20
SERVER_WAIT_SECONDS = 60
SANDBOX_NETWORK = Settings(_env_file=None).sandbox_network  # type: ignore[call-arg]
# curl's exit codes: 7 = could not connect (refused or unreachable), 28 = timed out.
CURL_COULD_NOT_CONNECT = 7


def probe(sandbox: Sandbox, *targets: tuple[str, str, int]) -> list[str]:
    command = f"python3 {PROBE_PATH} {shlex.quote(json.dumps(targets))} {PROBE_TIMEOUT_SECONDS}"
    response = sandbox.process.exec(command, timeout=PROBE_TIMEOUT_SECONDS * len(targets) + 30)
    assert response.exit_code == 0, response.result
    return json.loads(response.result)


def probe_from_host(*targets: tuple[str, str, int]) -> list[str]:
    argv = [sys.executable, "-c", PROBE, json.dumps(targets), str(PROBE_TIMEOUT_SECONDS)]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def curl(sandbox: Sandbox, url: str, *options: str) -> tuple[str, int]:
    """(HTTP status, curl exit code) of one request from inside `sandbox`."""
    quoted = " ".join(shlex.quote(option) for option in options)
    command = (
        f"curl -sS {quoted} --connect-timeout {PROBE_TIMEOUT_SECONDS} -o /dev/null -w '%{{http_code}}' "
        f'{shlex.quote(url)}; echo " $?"'
    )
    response = sandbox.process.exec(command, timeout=PROBE_TIMEOUT_SECONDS * 3)
    status, code = response.result.strip().rsplit(" ", 1)
    return status[-3:], int(code)


def sandbox_address(sandbox: Sandbox) -> str:
    inspect = subprocess.run(
        ["podman", "inspect", f"tidepool-{sandbox.id}"], capture_output=True, text=True, check=True
    )
    networks = json.loads(inspect.stdout)[0]["NetworkSettings"]["Networks"]
    assert list(networks) == [SANDBOX_NETWORK]
    return str(networks[SANDBOX_NETWORK]["IPAddress"])


def link_local_address(sandbox: Sandbox) -> str:
    """eth0's fe80:: address, from /proc/net/if_inet6 (32 hex digits, index, prefix, scope, flags, name)."""
    table = sandbox.process.exec("cat /proc/net/if_inet6").result
    for line in table.splitlines():
        fields = line.split()
        if fields[-1] == "eth0" and fields[0].startswith("fe80"):
            return str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    raise AssertionError(f"no IPv6 link-local address on eth0: {table}")


def default_gateway(sandbox: Sandbox) -> str:
    """The bridge gateway (the host's address on the sandbox network), from the sandbox's routing table."""
    table = sandbox.process.exec("cat /proc/net/route").result
    for line in table.splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return str(ipaddress.IPv4Address(bytes.fromhex(fields[2])[::-1]))
    raise AssertionError(f"no default route: {table}")


def host_addresses() -> list[str]:
    """Every global address of this host (eth0 and the bridges), IPv4 and IPv6."""
    shown = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True).stdout)
    return [
        info["local"] for link in shown for info in link.get("addr_info", []) if info.get("scope") == "global"
    ]


def uplink_address() -> str:
    """The host's address on its default route (eth0 here), as the internet sees the host."""
    route = subprocess.run(["ip", "-j", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True)
    return str(json.loads(route.stdout)[0]["prefsrc"])


def bridge_link_local() -> str:
    bridge = Settings(_env_file=None).sandbox_network_bridge  # type: ignore[call-arg]
    shown = subprocess.run(
        ["ip", "-j", "-6", "addr", "show", "dev", bridge, "scope", "link"], capture_output=True, text=True
    )
    links = json.loads(shown.stdout or "[]")
    return str(links[0]["addr_info"][0]["local"]) if links and links[0]["addr_info"] else ""


def wait_for_http(sandbox: Sandbox, url: str) -> None:
    message = f"{url} never answered inside the sandbox"
    wait_until(lambda: curl(sandbox, url)[0] == "200", message, timeout=SERVER_WAIT_SECONDS, interval=0.2)


@pytest.fixture(scope="module")
def sandboxes(stack: StackThread) -> Iterator[tuple[Sandbox, Sandbox]]:
    daytona = Daytona()
    created: list[Sandbox] = []
    try:
        for _ in range(2):
            sandbox = daytona.create()
            sandbox.fs.upload_file(PROBE.encode(), PROBE_PATH)
            created.append(sandbox)
        yield created[0], created[1]
    finally:
        for sandbox in created:
            daytona.delete(sandbox)


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """A server of the test's own on the host, on every address (0.0.0.0 and ::), answering "ok"."""
    with socket.socket() as probe_socket:
        probe_socket.bind(("0.0.0.0", 0))
        port = int(probe_socket.getsockname()[1])
    specs = [("tcp", "0.0.0.0", port), ("tcp", "::", port)]
    argv = [sys.executable, "-c", SERVER, json.dumps(specs)]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield port
    finally:
        process.kill()
        process.wait()


def test_a_sandbox_cannot_reach_another_sandbox(sandboxes: tuple[Sandbox, Sandbox]) -> None:
    a, b = sandboxes
    for port, bind in ((8000, "0.0.0.0"), (8001, "::")):
        session = f"server-{port}"  # one session each: a session runs its commands one after the other
        b.process.create_session(session)
        command = f"python3 -m http.server {port} --bind {bind}"
        b.process.execute_session_command(session, SessionExecuteRequest(command=command, run_async=True))
    wait_for_http(b, "http://127.0.0.1:8000/")
    wait_for_http(b, "http://[::1]:8001/")
    b_address, b_link_local = sandbox_address(b), link_local_address(b)

    # B's servers answer on B's own addresses, and the host can reach them: they are really listening there.
    assert curl(b, f"http://{b_address}:8000/") == ("200", 0)
    assert probe_from_host(("connect", b_address, 8000)) == ["connected"]

    status, code = curl(a, f"http://{b_address}:8000/")
    assert (status, code) == ("000", CURL_COULD_NOT_CONNECT), "refused at once, not timed out (28) nor 200"
    assert probe(a, ("connect", b_address, 8000), ("connect", f"{b_link_local}%eth0", 8001)) == [
        BLOCKED_TCP,
        BLOCKED_TCP,
    ]


def test_a_sandbox_cannot_reach_the_host_the_control_plane_or_metadata(
    stack: StackThread, sandboxes: tuple[Sandbox, Sandbox], host_server: int
) -> None:
    a, _ = sandboxes
    gateway = default_gateway(a)
    addresses = host_addresses()
    eth0 = uplink_address()
    assert gateway in addresses and eth0 in addresses
    # The server answers on the host's own addresses: only the firewall stands between it and the sandbox.
    assert probe_from_host(("tcp", eth0, host_server), ("tcp", gateway, host_server)) == ["ok", "ok"]

    targets = [("tcp", address, host_server) for address in addresses if ":" not in address]
    link_local = bridge_link_local()
    if link_local:
        targets.append(("tcp", f"{link_local}%eth0", host_server))
    assert probe(a, *targets) == [BLOCKED_TCP] * len(targets), targets
    # IPv6 global addresses of the host: the sandbox network has no IPv6 route at all.
    for address in (address for address in addresses if ":" in address):
        assert probe(a, ("tcp", address, host_server))[0] in (BLOCKED_TCP, "ENETUNREACH", "EHOSTUNREACH")

    env = stack.stack.env
    control_plane_ports = [
        stack.config.api_port,
        stack.config.proxy_port,
        int(env["TIDEPOOL_RUNNER_PORT"]),
        int(urlsplit(env["TIDEPOOL_NATS_URL"]).port or 0),
        int(urlsplit(env["TIDEPOOL_S3_ENDPOINT"]).port or 0),
    ]
    if env.get("TIDEPOOL_REGISTRY_URL"):
        control_plane_ports.append(int(env["TIDEPOOL_REGISTRY_URL"].rsplit(":", 1)[1]))
    targets = [("connect", host, port) for port in control_plane_ports for host in (gateway, eth0)]
    targets.append(("connect", "169.254.169.254", 80))
    assert probe(a, *targets) == [BLOCKED_TCP] * len(targets), targets


def test_dns_and_the_internet_still_work(sandboxes: tuple[Sandbox, Sandbox]) -> None:
    a, _ = sandboxes
    resolved = a.process.exec("getent hosts pypi.org")
    assert resolved.exit_code == 0 and "pypi.org" in resolved.result, resolved.result
    assert curl(a, "https://pypi.org/simple/", "--head") == ("200", 0)
    # The resolver is reachable for DNS only, even when it sits on a private address (as on this host).
    nameservers = [
        line.split()[1]
        for line in a.process.exec("cat /etc/resolv.conf").result.splitlines()
        if line.startswith("nameserver")
    ]
    assert nameservers
    private = [ns for ns in nameservers if ipaddress.ip_address(ns).is_private]
    if private:
        assert probe(a, ("connect", private[0], 80)) == [BLOCKED_TCP]
