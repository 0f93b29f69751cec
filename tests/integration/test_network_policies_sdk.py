"""Per-sandbox egress policies through the official SDK (daytona==0.226.1) against a real stack (behaviour
spec §5 "network-limits"): `networkBlockAll`, `networkAllowList` (IPv4 CIDRs) and `domainAllowList`, given at
create or changed on a running sandbox without a restart (`update_network_settings`), enforced by the
runner's host firewall.

Only the package index this machine already uses (pypi.org) and a server in a network namespace the test
creates are targeted (it plays the internet on a benchmarking address, 198.18.0.0/15, which the default
policy lets sandboxes reach).
Blocked connections are refused at once (TCP reset), so "blocked" is curl's exit code 7, never a time-out.
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from daytona import CreateSandboxFromSnapshotParams, Daytona, Sandbox

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

CURL_COULD_NOT_CONNECT = 7
CURL_COULD_NOT_RESOLVE = 6
CONNECT_TIMEOUT_SECONDS = 20  # a hang detector: refused connections fail at once
PYPI = "https://pypi.org/simple/"
# The namespace playing another host of the internet, reached over a veth pair from the host.
OUTSIDE_HOST_SIDE, OUTSIDE_ADDRESS = "198.18.77.1", "198.18.77.2"
OUTSIDE_PORT = 8080
OUTSIDE = f"http://{OUTSIDE_ADDRESS}:{OUTSIDE_PORT}/"
# The runner applies a change asynchronously (a job on the bus): poll for its effect.
APPLIED_WITHIN_SECONDS = 60


def ipv4_of(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, 443, socket.AF_INET, socket.SOCK_STREAM)})


def curl_exit(sandbox: Sandbox, url: str) -> int:
    """curl's exit code for one HEAD request from inside `sandbox` (0: it got an answer)."""
    return int(curl_output(sandbox, url).split()[-1])


def curl_output(sandbox: Sandbox, url: str) -> str:
    """curl's error message (if any) and exit code, for one HEAD request from inside `sandbox`."""
    command = (
        f"curl -sS --head -o /dev/null --connect-timeout {CONNECT_TIMEOUT_SECONDS} {shlex.quote(url)} 2>&1"
    )
    return sandbox.process.exec(f'{command}; echo " $?"', timeout=CONNECT_TIMEOUT_SECONDS * 3).result


def reaches(sandbox: Sandbox, url: str) -> bool:
    return curl_exit(sandbox, url) == 0


def refused(sandbox: Sandbox, url: str) -> bool:
    return curl_exit(sandbox, url) in (CURL_COULD_NOT_CONNECT, CURL_COULD_NOT_RESOLVE)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def outside() -> Iterator[str]:
    """An HTTP server at OUTSIDE in a network namespace of its own, routed from the host."""
    namespace, veth = f"tp-out-{uuid.uuid4().hex[:6]}", f"tpo{uuid.uuid4().hex[:6]}"
    run("ip", "netns", "add", namespace)
    server = None
    try:
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        run("ip", "addr", "add", f"{OUTSIDE_HOST_SIDE}/30", "dev", veth)
        run("ip", "link", "set", veth, "up")
        inside = ("ip", "netns", "exec", namespace)
        run(*inside, "ip", "addr", "add", f"{OUTSIDE_ADDRESS}/30", "dev", "eth0")
        run(*inside, "ip", "link", "set", "eth0", "up")
        run(*inside, "ip", "link", "set", "lo", "up")
        run(*inside, "ip", "route", "add", "default", "via", OUTSIDE_HOST_SIDE)
        server = subprocess.Popen(
            [*inside, sys.executable, "-m", "http.server", str(OUTSIDE_PORT), "--bind", OUTSIDE_ADDRESS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _answers_from_host(), "the outside server did not start")
        yield OUTSIDE
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def _answers_from_host() -> bool:
    try:
        with socket.create_connection((OUTSIDE_ADDRESS, OUTSIDE_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def pypi_allow_list(outside: str) -> str:
    """pypi.org's IPv4 addresses (as this machine resolves them) as /32s; the outside server is not one."""
    networks = [ipaddress.IPv4Network(f"{address}/32") for address in ipv4_of("pypi.org")[:10]]
    assert not any(ipaddress.IPv4Address(OUTSIDE_ADDRESS) in network for network in networks)
    return ",".join(str(network) for network in networks)


def test_a_running_sandbox_is_blocked_limited_and_opened_again_without_a_restart(
    pypi_allow_list: str,
) -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        assert reaches(sandbox, PYPI), curl_output(sandbox, PYPI)
        assert reaches(sandbox, OUTSIDE), curl_output(sandbox, OUTSIDE)
        marker = sandbox.process.exec("cut -d' ' -f22 /proc/1/stat").result

        sandbox.update_network_settings(network_block_all=True)
        assert sandbox.network_block_all is True
        wait_until(
            lambda: refused(sandbox, PYPI), "block-all did not block pypi.org", timeout=APPLIED_WITHIN_SECONDS
        )
        assert refused(sandbox, OUTSIDE)
        # Not even DNS, and nothing of the host or the internet by address.
        assert sandbox.process.exec("getent hosts pypi.org").exit_code != 0

        sandbox.update_network_settings(domain_allow_list="pypi.org")
        assert (sandbox.network_block_all, sandbox.domain_allow_list) == (False, "pypi.org")
        wait_until(
            lambda: reaches(sandbox, PYPI),
            "the domain allow list did not let pypi.org through",
            timeout=APPLIED_WITHIN_SECONDS,
        )
        assert refused(sandbox, OUTSIDE), "an address outside the domain allow list was reachable"

        only_outside = f"{OUTSIDE_ADDRESS}/32"
        sandbox.update_network_settings(network_allow_list=only_outside, domain_allow_list="")
        assert (sandbox.network_allow_list, sandbox.domain_allow_list) == (only_outside, None)
        wait_until(
            lambda: reaches(sandbox, OUTSIDE),
            "the CIDR allow list did not let its network through",
            timeout=APPLIED_WITHIN_SECONDS,
        )
        assert refused(sandbox, PYPI), "an address outside the CIDR allow list was reachable"

        sandbox.update_network_settings(network_block_all=False)
        assert (sandbox.network_block_all, sandbox.network_allow_list, sandbox.domain_allow_list) == (
            False,
            None,
            None,
        )
        wait_until(
            lambda: reaches(sandbox, PYPI),
            "block-all off did not restore egress",
            timeout=APPLIED_WITHIN_SECONDS,
        )
        assert reaches(sandbox, OUTSIDE)
        # All of it on the running sandbox: the same container, never restarted.
        assert sandbox.process.exec("cut -d' ' -f22 /proc/1/stat").result == marker
        sandbox.refresh_data()
        assert sandbox.state == "started"
    finally:
        daytona.delete(sandbox)


def test_a_policy_given_at_create_holds_from_the_first_command_and_after_a_restart(
    pypi_allow_list: str,
) -> None:
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(network_allow_list=pypi_allow_list))
    try:
        assert refused(sandbox, OUTSIDE), "the allow list was not in force for the first command"
        assert reaches(sandbox, PYPI)
        sandbox.refresh_data()
        assert sandbox.network_allow_list == pypi_allow_list
        sandbox.stop()
        sandbox.start()
        assert refused(sandbox, OUTSIDE), "the allow list was lost over a stop and a start"
        assert reaches(sandbox, PYPI)
    finally:
        daytona.delete(sandbox)


def test_block_all_at_create_reaches_nothing_and_can_be_lifted() -> None:
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(network_block_all=True))
    try:
        assert sandbox.process.exec("getent hosts pypi.org").exit_code != 0
        pypi = ipv4_of("pypi.org")[0]
        # By address: refused at once, the internet and the metadata service alike.
        assert curl_exit(sandbox, f"https://{pypi}/") == CURL_COULD_NOT_CONNECT
        assert curl_exit(sandbox, "http://169.254.169.254/") == CURL_COULD_NOT_CONNECT
        sandbox.update_network_settings(network_block_all=False)
        wait_until(
            lambda: reaches(sandbox, PYPI), "block-all could not be lifted", timeout=APPLIED_WITHIN_SECONDS
        )
    finally:
        daytona.delete(sandbox)


def test_bad_settings_are_refused_and_another_organization_sees_nothing(
    stack: StackThread, tenant_key: str
) -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        url = f"{stack.api_url}/sandbox/{sandbox.id}/network-settings"
        owner = {"Authorization": f"Bearer {stack.api_key}"}
        for body, message in (
            ({}, "at least one"),
            ({"networkAllowList": "2001:db8::/32"}, "IPv4"),
            ({"networkAllowList": "10.0.0.1"}, "Missing CIDR prefix length"),
            ({"networkAllowList": ",".join(f"10.0.{n}.0/24" for n in range(11))}, "more than 10"),
            ({"domainAllowList": "not a domain"}, "Invalid domain"),
        ):
            answer = httpx.post(url, json=body, headers=owner)
            assert answer.status_code == 400 and message in answer.text, (body, answer.text)
        sandbox.refresh_data()
        assert (sandbox.network_block_all, sandbox.network_allow_list) == (False, None), (
            "a refused change stuck"
        )
        stranger = httpx.post(
            url, json={"networkBlockAll": True}, headers={"Authorization": f"Bearer {tenant_key}"}
        )
        assert stranger.status_code == 404, stranger.text
        # The desired state (what the runner converges to) is unchanged, and the network still works.
        sandbox.refresh_data()
        assert (sandbox.network_block_all, sandbox.network_allow_list) == (False, None)
        assert reaches(sandbox, PYPI), "another organization's request changed the sandbox's network"
    finally:
        daytona.delete(sandbox)


def flows(stack: StackThread, sandbox: Sandbox, key: str | None = None, **query: str) -> httpx.Response:
    return httpx.get(
        f"{stack.api_url}/sandbox/{sandbox.id}/network/flows",
        params=query,
        headers={"Authorization": f"Bearer {key or stack.api_key}"},
        timeout=30,
    )


def flow_entries(stack: StackThread, sandbox: Sandbox, **query: str) -> list[dict[str, object]]:
    answer = flows(stack, sandbox, **query)
    assert answer.status_code == 200, answer.text
    return answer.json()["flows"]


def test_the_flow_log_says_what_was_denied_and_by_which_rule(
    stack: StackThread, outside: str, tenant_key: str
) -> None:
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(network_block_all=True))
    try:
        pypi = ipv4_of("pypi.org")[0]
        # The package index by name (DNS is denied too) and by address: both fail.
        assert curl_exit(sandbox, PYPI) == CURL_COULD_NOT_RESOLVE
        assert curl_exit(sandbox, f"https://{pypi}/simple/") == CURL_COULD_NOT_CONNECT

        def denied_to(destination: str, port: int) -> list[dict[str, object]]:
            return [
                entry
                for entry in flow_entries(stack, sandbox, verdict="denied")
                if entry["destination"] == destination and entry["port"] == port
            ]

        wait_until(lambda: denied_to(pypi, 443), "the flow log never showed the denied connection")
        entry = denied_to(pypi, 443)[0]
        assert entry["protocol"] == "tcp" and entry["verdict"] == "denied"
        assert entry["rule"] == "networkBlockAll"
        assert str(entry["time"]).endswith("Z")
        assert ipaddress.ip_address(str(entry["source"])).is_private
        # The DNS query that failed is in the log too, as a UDP flow to port 53.
        assert any(
            flow["port"] == 53 and flow["protocol"] in ("udp", "tcp")
            for flow in flow_entries(stack, sandbox, verdict="denied")
        )
        # Filters: only denied ones, and the newest N.
        assert not flow_entries(stack, sandbox, verdict="allowed")
        assert len(flow_entries(stack, sandbox, limit="1")) == 1
        # Another organization's key: the sandbox does not exist for it.
        assert flows(stack, sandbox, key=tenant_key).status_code == 404
    finally:
        daytona.delete(sandbox)


def test_the_flow_log_says_what_an_allow_list_allowed(stack: StackThread, outside: str) -> None:
    daytona = Daytona()
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(network_block_all=True))
    try:
        pypi = ipv4_of("pypi.org")[0]
        sandbox.update_network_settings(network_allow_list=f"{OUTSIDE_ADDRESS}/32")
        wait_until(
            lambda: reaches(sandbox, outside),
            "the CIDR allow list did not let its network through",
            timeout=APPLIED_WITHIN_SECONDS,
        )
        assert curl_exit(sandbox, f"https://{pypi}/simple/") == CURL_COULD_NOT_CONNECT

        def to_outside() -> list[dict[str, object]]:
            return [
                flow
                for flow in flow_entries(stack, sandbox)
                if flow["destination"] == OUTSIDE_ADDRESS and flow["port"] == OUTSIDE_PORT
            ]

        def allowed_to_outside() -> list[dict[str, object]]:
            return [flow for flow in to_outside() if flow["verdict"] == "allowed"]

        wait_until(allowed_to_outside, "the flow log never showed the allowed connection")
        # The attempts made while the new policy was being applied were denied, and say so; from the first
        # allowed connection on, none is.
        first_allowed = min(str(flow["time"]) for flow in allowed_to_outside())
        later = [flow for flow in to_outside() if str(flow["time"]) >= first_allowed]
        assert all(flow["verdict"] == "allowed" for flow in later), later
        assert all(flow["rule"] == f"networkAllowList {OUTSIDE_ADDRESS}/32" for flow in allowed_to_outside())
        wait_until(
            lambda: any(
                flow["rule"] == "not in networkAllowList or domainAllowList"
                for flow in flow_entries(stack, sandbox, verdict="denied")
                if flow["destination"] == pypi and flow["port"] == 443
            ),
            "the flow log never showed the address outside the allow list as denied",
        )
    finally:
        daytona.delete(sandbox)
