"""The sandbox firewall's rules, for real, inside network namespaces this test creates (the host's own
firewall is never touched).

Topology: a "host" namespace with the sandbox bridge (10.77.0.1/24) and an uplink (198.51.100.1/24) to an
"outside" namespace that plays the internet (198.51.100.2), a private resolver (10.99.0.53), a private service
(10.99.0.80) and the metadata service (169.254.169.254); two "sandbox" namespaces a (10.77.0.2) and
b (10.77.0.3) on the bridge, with IPv6 link-local addresses. Everything is reachable before the firewall is
applied, which shows each probe can tell "reachable" from "blocked". Blocked connections must fail at once
(refused/unreachable), never by timing out.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.netprobe import BLOCKED_TCP, BLOCKED_UDP, PROBE, SERVER
from tests.polling import wait_until
from tidepool_runner.firewall import (
    BRIDGE_NETFILTER_SYSCTLS,
    Commands,
    FirewallPolicy,
    SandboxEgress,
    apply,
    apply_sandbox,
    sandbox_tag,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
    pytest.mark.skipif(shutil.which("iptables-restore") is None, reason="needs iptables"),
]

BRIDGE = "tpfwbr0"
RESOLVER = "10.99.0.53"
INTERNET = "198.51.100.2"
PROBE_TIMEOUT_SECONDS = 10


def run(*argv: str, stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


@dataclass
class Lab:
    host: str
    a: str
    b: str
    outside: str
    lock_file: Path
    a_link_local: str = ""
    b_link_local: str = ""
    host_link_local: str = ""

    def ns(self, namespace: str, *argv: str, stdin: str | None = None) -> str:
        return run("ip", "netns", "exec", namespace, *argv, stdin=stdin)

    @property
    def commands(self) -> Commands:
        return Commands(prefix=("ip", "netns", "exec", self.host))

    def apply(self, policy: FirewallPolicy) -> None:
        apply(policy, self.commands, lock_file=self.lock_file)

    def probe(self, namespace: str, *targets: tuple[str, str, int]) -> list[str]:
        argv = (sys.executable, "-c", PROBE, json.dumps(targets), str(PROBE_TIMEOUT_SECONDS))
        return json.loads(self.ns(namespace, *argv))

    def filter_table(self, family: int = 4) -> list[str]:
        save = "iptables-save" if family == 4 else "ip6tables-save"
        return self.ns(self.host, save, "-t", "filter").splitlines()


def link_local(lab: Lab, namespace: str, device: str) -> str:
    shown = lab.ns(namespace, "ip", "-j", "-6", "addr", "show", "dev", device, "scope", "link")
    addresses = json.loads(shown)
    return str(addresses[0]["addr_info"][0]["local"])


def wait_until_ipv6_ready(lab: Lab, namespaces: list[str], deadline: float) -> None:
    """Link-local addresses exist and are no longer tentative (duplicate address detection is off anyway)."""
    for namespace in namespaces:

        def ready(namespace: str = namespace) -> bool:
            tentative = lab.ns(namespace, "ip", "-6", "addr", "show", "tentative").strip()
            return "fe80" in lab.ns(namespace, "ip", "-6", "addr", "show", "scope", "link") and not tentative

        message = f"IPv6 link-local addresses in {namespace} never got ready"
        wait_until(ready, message, timeout=max(deadline - time.monotonic(), 0))


def start_servers(lab: Lab, namespace: str, specs: list[tuple[str, str, int]]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", SERVER, json.dumps(specs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", f"servers in {namespace} did not start"
    return process


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    lab = Lab(
        host=f"tpfw-{tag}-host",
        a=f"tpfw-{tag}-a",
        b=f"tpfw-{tag}-b",
        outside=f"tpfw-{tag}-out",
        lock_file=tmp_path_factory.mktemp("firewall") / "lock",
    )
    namespaces = [lab.host, lab.a, lab.b, lab.outside]
    servers: list[subprocess.Popen[str]] = []
    try:
        for namespace in namespaces:
            run("ip", "netns", "add", namespace)
            lab.ns(namespace, "ip", "link", "set", "lo", "up")
            lab.ns(namespace, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0")
            lab.ns(namespace, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0")
        h = lab.host
        lab.ns(h, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # Off, as on a host where nothing enabled them: bridged packets would then skip iptables entirely.
        for name in BRIDGE_NETFILTER_SYSCTLS:
            lab.ns(h, "sysctl", "-q", "-w", f"{name}=0")
        lab.ns(h, "ip", "link", "add", BRIDGE, "type", "bridge")
        lab.ns(h, "ip", "addr", "add", "10.77.0.1/24", "dev", BRIDGE)
        lab.ns(h, "ip", "link", "set", BRIDGE, "up")
        for namespace, address in ((lab.a, "10.77.0.2"), (lab.b, "10.77.0.3")):
            port = f"p-{namespace[-1]}"
            lab.ns(h, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            lab.ns(h, "ip", "link", "set", port, "master", BRIDGE, "up")
            lab.ns(namespace, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            lab.ns(namespace, "ip", "link", "set", "eth0", "up")
            lab.ns(namespace, "ip", "route", "add", "default", "via", "10.77.0.1")
        lab.ns(h, "ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", lab.outside)
        lab.ns(h, "ip", "addr", "add", "198.51.100.1/24", "dev", "uplink")
        lab.ns(h, "ip", "link", "set", "uplink", "up")
        lab.ns(h, "ip", "route", "add", "10.99.0.0/24", "via", INTERNET)
        lab.ns(h, "ip", "route", "add", "169.254.169.254/32", "via", INTERNET)
        o = lab.outside
        lab.ns(o, "ip", "addr", "add", f"{INTERNET}/24", "dev", "eth0")
        for address in (f"{RESOLVER}/32", "10.99.0.80/32", "169.254.169.254/32"):
            lab.ns(o, "ip", "addr", "add", address, "dev", "lo")
        lab.ns(o, "ip", "link", "set", "eth0", "up")
        lab.ns(o, "ip", "route", "add", "default", "via", "198.51.100.1")
        wait_until_ipv6_ready(lab, [lab.host, lab.a, lab.b], time.monotonic() + 30)
        lab.a_link_local = link_local(lab, lab.a, "eth0")
        lab.b_link_local = link_local(lab, lab.b, "eth0")
        lab.host_link_local = link_local(lab, lab.host, BRIDGE)
        servers.append(start_servers(lab, lab.b, [("tcp", "0.0.0.0", 8080), ("tcp", "::", 8080)]))
        servers.append(start_servers(lab, lab.a, [("tcp", "0.0.0.0", 8080)]))
        servers.append(start_servers(lab, h, [("tcp", "0.0.0.0", 8081), ("tcp", "::", 8081)]))
        outside_services = [
            ("tcp", INTERNET, 80),
            ("udp", RESOLVER, 53),
            ("tcp", RESOLVER, 53),
            ("tcp", RESOLVER, 80),
            ("tcp", "10.99.0.80", 80),
            ("tcp", "169.254.169.254", 80),
        ]
        servers.append(start_servers(lab, o, outside_services))
        yield lab
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for namespace in namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def forget_neighbours(lab: Lab) -> None:
    for namespace in (lab.host, lab.a, lab.b):
        lab.ns(namespace, "ip", "neigh", "flush", "all")
        lab.ns(namespace, "ip", "-6", "neigh", "flush", "all")


def sandbox_targets(lab: Lab) -> list[tuple[str, str, int]]:
    """From sandbox a: other sandbox (v4, v6), host (bridge gateway, uplink, v6), internet, DNS, private."""
    return [
        ("tcp", "10.77.0.3", 8080),
        ("tcp", f"{lab.b_link_local}%eth0", 8080),
        ("tcp", "10.77.0.1", 8081),
        ("tcp", "198.51.100.1", 8081),
        ("tcp", f"{lab.host_link_local}%eth0", 8081),
        ("tcp", "169.254.169.254", 80),
        ("tcp", "10.99.0.80", 80),
        ("tcp", RESOLVER, 80),
        ("udp", RESOLVER, 53),
        ("tcp", RESOLVER, 53),
        ("tcp", INTERNET, 80),
    ]


POLICY = FirewallPolicy(bridge=BRIDGE, resolvers=(RESOLVER,))
DEFAULT_VERDICTS = [
    BLOCKED_TCP,  # sandbox b over IPv4
    BLOCKED_TCP,  # sandbox b over IPv6 link-local
    BLOCKED_TCP,  # the host on the bridge gateway
    BLOCKED_TCP,  # the host on its uplink address
    BLOCKED_TCP,  # the host on its IPv6 link-local address
    BLOCKED_TCP,  # the metadata service
    BLOCKED_TCP,  # a private service
    BLOCKED_TCP,  # the resolver, but not DNS
    "ok",  # DNS over UDP
    "ok",  # DNS over TCP
    "ok",  # the internet
]


def jump_counts(lab: Lab, family: int = 4) -> dict[str, int]:
    counts = {"INPUT": 0, "FORWARD": 0, "CNI-ADMIN": 0}
    for line in lab.filter_table(family):
        parts = line.split()
        if len(parts) > 2 and parts[0] == "-A" and parts[1] in counts and parts[-1].startswith("TIDEPOOL-"):
            counts[parts[1]] += 1
    return counts


def test_firewall_isolates_sandboxes_and_keeps_dns_and_internet(lab: Lab) -> None:
    targets = sandbox_targets(lab)
    assert lab.probe(lab.a, *targets) == ["ok"] * len(targets), "everything is reachable without the firewall"

    lab.apply(POLICY)
    forget_neighbours(lab)  # a fresh sandbox has to resolve its peer's address first (ARP/ND)
    for name in BRIDGE_NETFILTER_SYSCTLS:
        assert lab.ns(lab.host, "sysctl", "-n", name).strip() == "1"

    assert lab.probe(lab.a, *targets) == DEFAULT_VERDICTS
    assert lab.probe(lab.b, ("tcp", "10.77.0.2", 8080), ("tcp", "10.77.0.3", 8080)) == [BLOCKED_TCP, "ok"]
    # Blocked UDP answers at once too (ICMP prohibited), e.g. a "DNS server" on the metadata address.
    assert lab.probe(lab.a, ("udp", "169.254.169.254", 53)) == [BLOCKED_UDP]
    # The host itself may still open connections to sandboxes (the runner and operators do), and replies
    # reach it; nothing from outside the bridge may (say, a build container on another network).
    assert lab.probe(lab.host, ("tcp", "10.77.0.3", 8080), ("tcp", f"{lab.b_link_local}%{BRIDGE}", 8080)) == [
        "ok",
        "ok",
    ]
    lab.ns(lab.outside, "ip", "route", "add", "10.77.0.0/24", "via", "198.51.100.1")
    assert lab.probe(lab.outside, ("tcp", "10.77.0.3", 8080)) == [BLOCKED_TCP]


def test_reapplying_never_duplicates_jumps_and_keeps_them_first(lab: Lab) -> None:
    lab.apply(POLICY)
    # Something else inserting at the top meanwhile (as CNI's firewall plugin does with `-I FORWARD 1`).
    lab.ns(lab.host, "iptables", "-I", "FORWARD", "1", "-s", "10.77.0.0/24", "-j", "ACCEPT")
    lab.ns(lab.host, "iptables", "-I", "INPUT", "1", "-s", "10.77.0.0/24", "-j", "ACCEPT")
    for _ in range(3):
        lab.apply(POLICY)
    threads = [threading.Thread(target=lab.apply, args=(POLICY,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for family in (4, 6):
        assert jump_counts(lab, family) == {"INPUT": 1, "FORWARD": 2, "CNI-ADMIN": 2}
    table = lab.filter_table()
    forward = [line for line in table if line.startswith("-A FORWARD ")]
    assert forward[0].endswith("-j TIDEPOOL-FORWARD") and forward[1].endswith("-j TIDEPOOL-FORWARD")
    assert next(line for line in table if line.startswith("-A INPUT ")).endswith("-j TIDEPOOL-INPUT")
    assert lab.probe(lab.a, *sandbox_targets(lab)) == DEFAULT_VERDICTS
    lab.ns(lab.host, "iptables", "-D", "FORWARD", "-s", "10.77.0.0/24", "-j", "ACCEPT")
    lab.ns(lab.host, "iptables", "-D", "INPUT", "-s", "10.77.0.0/24", "-j", "ACCEPT")


def test_cni_firewall_plugin_inserted_above_us_still_goes_through_our_rules(lab: Lab) -> None:
    """The CNI plugin inserts `-j CNI-FORWARD` at the top of FORWARD when it is missing (first container
    after a reboot) and accepts everything from the container's IP there, after its CNI-ADMIN hook."""
    lab.apply(POLICY)
    h = lab.host
    lab.ns(h, "iptables", "-N", "CNI-FORWARD")
    lab.ns(h, "iptables", "-A", "CNI-FORWARD", "-j", "CNI-ADMIN")
    for address in ("10.77.0.2", "10.77.0.3"):
        lab.ns(h, "iptables", "-A", "CNI-FORWARD", "-s", address, "-j", "ACCEPT")
    lab.ns(h, "iptables", "-I", "FORWARD", "1", "-j", "CNI-FORWARD")
    try:
        assert lab.probe(lab.a, *sandbox_targets(lab)) == DEFAULT_VERDICTS
    finally:
        lab.ns(h, "iptables", "-D", "FORWARD", "-j", "CNI-FORWARD")
        lab.ns(h, "iptables", "-F", "CNI-FORWARD")
        lab.ns(h, "iptables", "-X", "CNI-FORWARD")


def test_operator_widening_and_per_sandbox_narrowing(lab: Lab) -> None:
    widened = FirewallPolicy(
        bridge=BRIDGE, resolvers=(RESOLVER,), allowed_cidrs=("10.99.0.80/32",), allow_inter_sandbox=True
    )
    lab.apply(widened)
    targets = [("tcp", "10.77.0.3", 8080), ("tcp", "10.99.0.80", 80), ("tcp", "169.254.169.254", 80)]
    assert lab.probe(lab.a, *targets) == ["ok", "ok", BLOCKED_TCP]

    lab.apply(POLICY)
    assert lab.probe(lab.a, *targets) == [BLOCKED_TCP, BLOCKED_TCP, BLOCKED_TCP]

    # A per-sandbox policy (issue #11) hooks into the dispatch chain by container IP and survives re-applies.
    h = lab.host
    lab.ns(h, "iptables", "-N", "TIDEPOOL-SB-A")
    lab.ns(h, "iptables", "-A", "TIDEPOOL-SB-A", "-j", "TIDEPOOL-REJECT")
    lab.ns(h, "iptables", "-A", "TIDEPOOL-SANDBOXES", "-s", "10.77.0.2", "-j", "TIDEPOOL-SB-A")
    try:
        lab.apply(POLICY)
        internet = ("tcp", INTERNET, 80)
        assert lab.probe(lab.a, internet) == [BLOCKED_TCP]
        assert lab.probe(lab.b, internet) == ["ok"]
    finally:
        lab.ns(h, "iptables", "-D", "TIDEPOOL-SANDBOXES", "-s", "10.77.0.2", "-j", "TIDEPOOL-SB-A")
        lab.ns(h, "iptables", "-F", "TIDEPOOL-SB-A")
        lab.ns(h, "iptables", "-X", "TIDEPOOL-SB-A")


# Runs in the host namespace: the runner's flow-log reader (tidepool_runner.flowlog) on a free NFLOG group
# from argv[1]; prints the group, then, once stdin closes, every packet logged meanwhile as JSON.
FLOW_READER = r"""
import asyncio, json, sys
from tidepool_runner.flowlog import NflogSocket, read_forever
nflog = NflogSocket(int(sys.argv[1]))
print(nflog.open(), flush=True)
got = []
def keep(packet):
    got.append([packet.prefix, packet.protocol, packet.source, packet.destination, packet.port])
async def main():
    async def handle(packet):
        keep(packet)
    reading = asyncio.create_task(read_forever(nflog, handle))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for packet in nflog.receive():  # logged synchronously with the verdict: already in the socket
        keep(packet)
    reading.cancel()
asyncio.run(main())
print(json.dumps(got), flush=True)
"""


def test_the_flow_log_reads_each_decision_of_a_sandbox_policy(lab: Lab) -> None:
    lab.apply(POLICY)
    reader = subprocess.Popen(
        ["ip", "netns", "exec", lab.host, sys.executable, "-c", FLOW_READER, "7300"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None and reader.stdout is not None
    tag = sandbox_tag("sbx-flow")
    try:
        group = int(reader.stdout.readline())
        only_dns = SandboxEgress(allowed=(), log_group=group)
        apply_sandbox(POLICY, "sbx-flow", ["10.77.0.2"], only_dns, lab.commands, lab.lock_file)
        assert lab.probe(lab.a, ("tcp", INTERNET, 80), ("udp", RESOLVER, 53)) == [BLOCKED_TCP, "ok"]
        assert lab.probe(lab.b, ("tcp", INTERNET, 80)) == ["ok"]  # no policy, no flow log
        internet = SandboxEgress(allowed=(f"{INTERNET}/32",), log_group=group)
        apply_sandbox(POLICY, "sbx-flow", ["10.77.0.2"], internet, lab.commands, lab.lock_file)
        assert lab.probe(lab.a, ("tcp", INTERNET, 80)) == ["ok"]
        reader.stdin.close()
        logged = json.loads(reader.stdout.readline())
    finally:
        apply_sandbox(POLICY, "sbx-flow", ["10.77.0.2"], None, lab.commands, lab.lock_file)
        if reader.poll() is None:
            reader.kill()
        reader.wait()
    assert logged == [
        [f"TPF {tag} D", "tcp", "10.77.0.2", INTERNET, 80],
        [f"TPF {tag} AD", "udp", "10.77.0.2", RESOLVER, 53],
        [f"TPF {tag} A0", "tcp", "10.77.0.2", INTERNET, 80],
    ]
