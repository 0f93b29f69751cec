"""The host firewall that isolates sandboxes: our own iptables/ip6tables chains for the sandbox bridge.

Default policy for a connection that a sandbox opens (IPv4 and IPv6 alike):

- to the host itself, on any of its addresses (the bridge gateway, eth0, …) → rejected, except DNS to the
  sandbox resolvers and the operator's `allowed_cidrs`;
- to another sandbox on the bridge → rejected (unless `allow_inter_sandbox`);
- to link-local/metadata, private, loopback, multicast and reserved ranges (`BLOCKED_IPV4`/`BLOCKED_IPV6`)
  → rejected, except DNS (port 53) to the resolvers and the operator's `allowed_cidrs`;
- anything else (the internet) → accepted.

New connections from elsewhere into the sandbox bridge (say, a build container on the engine's default
network) are rejected too; return traffic of accepted connections always passes. Rejections answer at once
(TCP reset, ICMP "administratively prohibited"), so a blocked connect fails fast instead of hanging.

Chains (filter table, `<prefix>` = `TIDEPOOL`): `<prefix>-INPUT` is jumped to from `INPUT` and
`<prefix>-FORWARD` from `FORWARD`, at the top, for traffic in or out of the bridge only, so the host's other
traffic never enters them. The jumps are also placed in `CNI-ADMIN`, the CNI firewall plugin's documented
hook for admin overrides: the plugin inserts its own `CNI-FORWARD` (which accepts everything from a
container's IP) at the top of `FORWARD` whenever that jump is missing, i.e. possibly above ours, but it
always evaluates `CNI-ADMIN` first. `<prefix>-FORWARD` then goes through `<prefix>-SANDBOXES`, the
dispatch chain for per-sandbox policies (a jump per container IP, added when such a sandbox starts; those
may only narrow: REJECT, or RETURN to fall through), and `<prefix>-EGRESS`, the default policy above.

Everything is applied in one `iptables-restore --noflush` transaction per family: our chains are rewritten,
every existing jump to them from `INPUT`/`FORWARD`/`CNI-ADMIN` is deleted and re-inserted once, and the
dispatch chain is created only when missing (its per-sandbox jumps survive a runner restart). So applying is
idempotent, never duplicates a jump, and never touches a rule that isn't ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from tidepool_runtime.isolation import BRIDGE_NAME
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.firewall")

Family = Literal[4, 6]

# Destinations a sandbox may not open connections to (besides the host and other sandboxes).
BLOCKED_IPV4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private (RFC 1918)
    "100.64.0.0/10",  # carrier-grade NAT, often cloud-internal
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, including cloud metadata at 169.254.169.254
    "172.16.0.0/12",  # private
    "192.168.0.0/16",  # private
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
)
BLOCKED_IPV6 = (
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::ffff:0:0/96",  # IPv4-mapped
    "fc00::/7",  # unique local (private)
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)
DNS_PORT = 53
ICMPV6_NEIGHBOR_DISCOVERY = ("neighbour-solicitation", "neighbour-advertisement")
JUMP_COMMENT = "tidepool sandbox isolation"
# Chains our jumps live in; any jump from them to one of our chains is ours to delete and re-insert.
HOOK_CHAINS = ("INPUT", "FORWARD")
CNI_ADMIN_CHAIN = "CNI-ADMIN"
# Serializes read-render-apply between runners on one host (iptables-restore only locks its own run).
LOCK_FILE = Path("/run/tidepool-firewall.lock")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
CHAIN_PREFIX = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")
RESOLV_CONF_FILES = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))
BRIDGE_NETFILTER_SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


class FirewallError(RuntimeError):
    """The sandbox firewall could not be set up; the message says what to fix."""


@dataclass(frozen=True)
class FirewallPolicy:
    """What the rules say. `resolvers` are IP addresses, `allowed_cidrs` networks (either family, mixed)."""

    bridge: str
    resolvers: tuple[str, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()
    allow_inter_sandbox: bool = False
    chain_prefix: str = "TIDEPOOL"

    def __post_init__(self) -> None:
        # Everything below ends up in iptables-restore input: accept only what can't smuggle in syntax.
        if not BRIDGE_NAME.match(self.bridge):
            raise FirewallError(f"bridge name {self.bridge!r} is not a valid interface name (1-15 chars)")
        if not CHAIN_PREFIX.match(self.chain_prefix):
            raise FirewallError(f"chain prefix {self.chain_prefix!r} must be 1-16 of A-Z, 0-9, _")
        for address in self.resolvers:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise FirewallError(f"DNS server {address!r} is not an IP address") from None
        for cidr in self.allowed_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise FirewallError(f"allowed CIDR {cidr!r} is not an IP network") from None

    def chain(self, role: str) -> str:
        return f"{self.chain_prefix}-{role}"

    @property
    def input_chain(self) -> str:
        return self.chain("INPUT")

    @property
    def forward_chain(self) -> str:
        return self.chain("FORWARD")

    @property
    def egress_chain(self) -> str:
        return self.chain("EGRESS")

    @property
    def reject_chain(self) -> str:
        return self.chain("REJECT")

    @property
    def sandboxes_chain(self) -> str:
        """Per-sandbox dispatch: `-s <container ip> -j <per-sandbox chain>` rules, managed elsewhere."""
        return self.chain("SANDBOXES")

    @property
    def rewritten_chains(self) -> tuple[str, ...]:
        """Chains whose whole content is ours and rewritten on every apply."""
        return (self.reject_chain, self.egress_chain, self.input_chain, self.forward_chain)

    @property
    def own_chains(self) -> tuple[str, ...]:
        return (*self.rewritten_chains, self.sandboxes_chain)


def policy_from_settings(settings: RunnerSettings, host_resolvers: Sequence[str]) -> FirewallPolicy:
    """The policy for `settings`; `host_resolvers` are used when `sandbox_dns_servers` is empty (the engine
    then gives sandboxes the host's resolvers). Raises FirewallError on an invalid address or bridge name."""
    resolvers = tuple(settings.sandbox_dns_servers) or tuple(host_resolvers)
    return FirewallPolicy(
        bridge=settings.sandbox_network_bridge,
        resolvers=resolvers,
        allowed_cidrs=tuple(settings.sandbox_allowed_cidrs),
        allow_inter_sandbox=settings.sandbox_allow_inter_sandbox,
    )


def host_resolvers(files: Iterable[Path] = RESOLV_CONF_FILES) -> tuple[str, ...]:
    """The nameservers a container engine copies into containers: those of the first resolv.conf that has
    any besides loopback ones (Podman and Docker skip loopback resolvers, then try systemd-resolved's
    upstream list). Empty when none is found: the engine then falls back to public resolvers."""
    for path in files:
        with contextlib.suppress(OSError):
            found: list[str] = []
            for line in path.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        address = ipaddress.ip_address(fields[1].split("%")[0])
                    except ValueError:
                        continue
                    if not address.is_loopback:
                        found.append(str(address))
            if found:
                return tuple(dict.fromkeys(found))
    return ()


def _of_family(values: Iterable[str], family: Family) -> list[str]:
    return [value for value in values if ipaddress.ip_network(value, strict=False).version == family]


def _existing_state(current: str) -> tuple[set[str], list[tuple[str, str]]]:
    """Chain names and `(chain, rule spec)` of the `-A` lines in `iptables-save -t filter` output."""
    chains: set[str] = set()
    rules: list[tuple[str, str]] = []
    for line in current.splitlines():
        if line.startswith(":"):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            rules.append((chain, rest[0] if rest else ""))
    return chains, rules


def _jump_target(spec: str) -> str | None:
    match = re.search(r"(?:^|\s)-j\s+(\S+)", spec)
    return match.group(1) if match else None


def render(policy: FirewallPolicy, family: Family, current: str = "") -> str:
    """`iptables-restore --noflush` input (or ip6tables-restore for `family` 6) that brings the filter table
    from `current` (`iptables-save -t filter` output; "" for an empty table) to `policy`. Pure."""
    bridge = policy.bridge
    chains, rules = _existing_state(current)
    reject, egress = policy.reject_chain, policy.egress_chain
    resolvers = _of_family(policy.resolvers, family)
    allowed = _of_family(policy.allowed_cidrs, family)
    blocked = BLOCKED_IPV4 if family == 4 else BLOCKED_IPV6
    icmp_reject = "icmp-admin-prohibited" if family == 4 else "icmp6-adm-prohibited"
    comment = f'-m comment --comment "{JUMP_COMMENT}"'

    lines = ["*filter"]
    # Declaring a chain creates it, or (with --noflush) empties it: the dispatch chain and CNI's admin chain
    # are declared only when missing, so their rules (per-sandbox jumps, other admins' overrides) survive.
    declared = [*policy.rewritten_chains]
    declared += [name for name in (policy.sandboxes_chain, CNI_ADMIN_CHAIN) if name not in chains]
    lines += [f":{name} - [0:0]" for name in declared]

    own = set(policy.own_chains)
    for chain, spec in rules:
        if chain in (*HOOK_CHAINS, CNI_ADMIN_CHAIN) and _jump_target(spec) in own:
            lines.append(f"-D {chain} {spec}")

    def add(chain: str, spec: str) -> None:
        lines.append(f"-A {chain} {spec}")

    add(reject, "-p tcp -j REJECT --reject-with tcp-reset")
    add(reject, f"-j REJECT --reject-with {icmp_reject}")

    def dns_to_resolvers(chain: str, verdict: str) -> None:
        for resolver in resolvers:
            for protocol in ("udp", "tcp"):
                add(chain, f"-d {resolver} -p {protocol} -m {protocol} --dport {DNS_PORT} -j {verdict}")

    # The host, reached from the bridge on any of its addresses. RETURN, not ACCEPT: we only take away, the
    # host's own INPUT rules still decide about what we let through.
    inp = policy.input_chain
    add(inp, "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN")
    if family == 6:
        # Address resolution (ARP's job for IPv4), so a connect to the host's link-local address is rejected
        # below instead of hanging.
        for icmp_type in ICMPV6_NEIGHBOR_DISCOVERY:
            add(inp, f"-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -j RETURN")
    # Per-sandbox policies narrow what reaches the host too (DNS, for block-all and allow lists).
    add(inp, f"-j {policy.sandboxes_chain}")
    dns_to_resolvers(inp, "RETURN")
    for cidr in allowed:
        add(inp, f"-d {cidr} -j RETURN")
    add(inp, f"-j {reject}")

    fwd = policy.forward_chain
    add(fwd, "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    # Reached through the `-o bridge` jump: a new connection into a sandbox from outside the bridge.
    add(fwd, f"! -i {bridge} -j {reject}")
    # Bridged sandbox-to-sandbox traffic (seen here thanks to br_netfilter). Address resolution passes, as
    # ARP does for IPv4: without it a connect to a neighbour's link-local address hangs until it times out,
    # instead of reaching the rejection below.
    if family == 6:
        for icmp_type in ICMPV6_NEIGHBOR_DISCOVERY:
            add(fwd, f"-o {bridge} -p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -j ACCEPT")
    add(fwd, f"-o {bridge} -j {'ACCEPT' if policy.allow_inter_sandbox else reject}")
    add(fwd, f"-j {policy.sandboxes_chain}")
    add(fwd, f"-j {egress}")

    dns_to_resolvers(egress, "ACCEPT")
    for cidr in allowed:
        add(egress, f"-d {cidr} -j ACCEPT")
    for cidr in blocked:
        add(egress, f"-d {cidr} -j {reject}")
    add(egress, "-j ACCEPT")

    # At the top of INPUT/FORWARD (ahead of CNI's and any accept-all rule); -I in reverse keeps the order.
    lines.append(f"-I INPUT 1 -i {bridge} {comment} -j {inp}")
    lines.append(f"-I FORWARD 1 -o {bridge} {comment} -j {fwd}")
    lines.append(f"-I FORWARD 1 -i {bridge} {comment} -j {fwd}")
    lines.append(f"-I {CNI_ADMIN_CHAIN} 1 -o {bridge} {comment} -j {fwd}")
    lines.append(f"-I {CNI_ADMIN_CHAIN} 1 -i {bridge} {comment} -j {fwd}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Commands:
    """How to run the tools; `prefix` runs them elsewhere (tests: `ip netns exec <ns>`)."""

    prefix: tuple[str, ...] = ()

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        binary = argv[0] if self.prefix else (shutil.which(argv[0], path=SBIN_PATH) or argv[0])
        try:
            result = subprocess.run(
                [*self.prefix, binary, *argv[1:]], input=stdin, capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise FirewallError(f"{argv[0]} not found: install iptables (nf_tables or legacy)") from None
        if result.returncode != 0:
            raise FirewallError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout


def ensure_bridge_netfilter(commands: Commands) -> None:
    """Bridged (sandbox-to-sandbox) packets reach iptables only with br_netfilter and these sysctls on."""
    if not commands.prefix and not Path("/proc/sys/net/bridge").exists():
        with contextlib.suppress(FirewallError):
            commands.run(["modprobe", "br_netfilter"])
    for name in BRIDGE_NETFILTER_SYSCTLS:
        try:
            # Written only when needed: /proc/sys is read-only in many containers (a runner in a pod).
            if commands.run(["sysctl", "-n", name]).strip() != "1":
                commands.run(["sysctl", "-q", "-w", f"{name}=1"])
        except FirewallError as error:
            raise FirewallError(
                f"cannot enable {name} ({error}): without br_netfilter, traffic between sandboxes on the "
                "bridge bypasses the firewall; load it with `modprobe br_netfilter`"
            ) from None


def ipv6_enabled(commands: Commands) -> bool:
    return bool(commands.prefix) or Path("/proc/net/if_inet6").exists()


def apply(policy: FirewallPolicy, commands: Commands = Commands(), lock_file: Path = LOCK_FILE) -> None:
    """Set up the rules for `policy` on this host (idempotent; blocking: call it from a thread).

    Raises FirewallError when the tools are missing, the caller lacks CAP_NET_ADMIN, or the kernel refuses.
    """
    ensure_bridge_netfilter(commands)
    families: list[tuple[Family, str, str]] = [(4, "iptables-save", "iptables-restore")]
    if ipv6_enabled(commands):
        families.append((6, "ip6tables-save", "ip6tables-restore"))
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for family, save, restore in families:
            current = commands.run([save, "-t", "filter"])
            commands.run([restore, "-w", "--noflush"], stdin=render(policy, family, current))
    log.info(
        "firewall.applied",
        bridge=policy.bridge,
        families=[family for family, _, _ in families],
        resolvers=list(policy.resolvers),
        allowed_cidrs=list(policy.allowed_cidrs),
        inter_sandbox=policy.allow_inter_sandbox,
    )


# ----- per-sandbox egress policies (networkBlockAll, networkAllowList, domainAllowList) --------------------


@dataclass(frozen=True)
class SandboxEgress:
    """One sandbox's own egress policy, which only narrows the runner's default policy: with `block_all`
    nothing (not even DNS); otherwise only `allowed` (networks, either family) and DNS to the resolvers."""

    block_all: bool = False
    allowed: tuple[str, ...] = ()
    # The NFLOG group of the runner's flow log (flowlog.py): each new flow the policy decides is logged there
    # first, with the prefix `flow_prefix(...)`; None: no flow log.
    log_group: int | None = None
    # Which version of the sandbox's policy this is, in its flow-log prefixes: a packet the kernel logged just
    # before or after a change is read with the rules that logged it (None: no generation in the prefix).
    generation: int | None = None

    def __post_init__(self) -> None:
        for cidr in self.allowed:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise FirewallError(f"allowed network {cidr!r} is not an IP network") from None


SANDBOX_COMMENT_PREFIX = "tidepool sandbox "
_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def sandboxes_with_policies(policy: FirewallPolicy, current: str) -> dict[str, tuple[str, ...]]:
    """Sandbox id -> source addresses of the dispatch rules in `current` (`iptables-save -t filter`)."""
    found: dict[str, list[str]] = {}
    _, rules = _existing_state(current)
    for chain, spec in rules:
        if chain != policy.sandboxes_chain:
            continue
        comment = re.search(r'--comment "?' + re.escape(SANDBOX_COMMENT_PREFIX) + r"([A-Za-z0-9_-]+)", spec)
        source = re.search(r"(?:^|\s)-s\s+(\S+)", spec)
        if comment and source:
            found.setdefault(comment.group(1), []).append(source.group(1).split("/")[0])
    return {sandbox_id: tuple(addresses) for sandbox_id, addresses in found.items()}


def sandbox_tag(sandbox_id: str) -> str:
    """8 hex digits naming the sandbox in its chain's name and its flow-log prefixes."""
    return hashlib.sha256(sandbox_id.encode()).hexdigest()[:8]


def sandbox_chain(policy: FirewallPolicy, sandbox_id: str) -> str:
    """The sandbox's own chain: `<prefix>-S-<8 hex>` (iptables allows 28 characters)."""
    return policy.chain(f"S-{sandbox_tag(sandbox_id)}")


FLOW_PREFIX = "TPF"
# Flow-log rate per sandbox: a sandbox hammering a blocked address cannot flood the log (the verdict holds).
FLOW_LOG_LIMIT = "-m limit --limit 50/second --limit-burst 200"


def flow_prefix(sandbox_id: str, decision: str, generation: int | None = None) -> str:
    """The NFLOG prefix of one rule of the sandbox's chain: `TPF <tag> <decision>[ <generation>]`; decision
    `D` (denied), `A<n>` (allowed by `allowed[n]`) or `AD` (DNS to the resolvers)."""
    prefix = f"{FLOW_PREFIX} {sandbox_tag(sandbox_id)} {decision}"
    return prefix if generation is None else f"{prefix} {generation}"


def render_sandbox(
    policy: FirewallPolicy,
    family: Family,
    sandbox_id: str,
    addresses: Sequence[str],
    egress: SandboxEgress | None,
    current: str,
) -> str:
    """`iptables-restore --noflush` input that gives the sandbox at `addresses` (its container's addresses
    of this family) the policy `egress`, or removes its policy (`None`). Pure.

    Every dispatch rule for one of `addresses` is replaced too: an address is reused by the next sandbox,
    and a stale rule must never apply another sandbox's policy to it."""
    if not _SANDBOX_ID.match(sandbox_id):
        raise FirewallError(f"sandbox id {sandbox_id!r} is not a valid id")
    chains, rules = _existing_state(current)
    own = sandbox_chain(policy, sandbox_id)
    dispatch = policy.sandboxes_chain
    hosts = {str(ipaddress.ip_address(address)) for address in addresses}
    deleted: list[str] = []
    for chain, spec in rules:
        if chain != dispatch:
            continue
        source = re.search(r"(?:^|\s)-s\s+(\S+)", spec)
        source_host = source.group(1).split("/")[0] if source else None
        if _jump_target(spec) == own or source_host in hosts:
            deleted.append(spec)
    # Another sandbox's chain that only the deleted rules used goes too.
    still_used = {_jump_target(spec) for chain, spec in rules if chain == dispatch and spec not in deleted}
    orphans = sorted(
        target
        for target in {_jump_target(spec) for spec in deleted}
        if target is not None and target != own and target in chains and target not in still_used
    )
    # Declarations first (declaring an existing chain empties it: --noflush keeps everything else).
    lines = ["*filter"]
    if dispatch not in chains:
        lines.append(f":{dispatch} - [0:0]")
    if egress is not None or own in chains:
        lines.append(f":{own} - [0:0]")
    lines += [f":{orphan} - [0:0]" for orphan in orphans]
    lines += [f"-D {dispatch} {spec}" for spec in deleted]
    lines += [f"-X {orphan}" for orphan in orphans]
    if egress is not None:

        def decide(match: str, verdict: str, decision: str) -> None:
            if egress.log_group is not None:
                prefix = flow_prefix(sandbox_id, decision, egress.generation)
                lines.append(
                    f"-A {own} {match}{FLOW_LOG_LIMIT} "
                    f'-j NFLOG --nflog-group {egress.log_group} --nflog-prefix "{prefix}"'
                )
            lines.append(f"-A {own} {match}-j {verdict}")

        if not egress.block_all:
            for index, cidr in enumerate(egress.allowed):
                if ipaddress.ip_network(cidr, strict=False).version == family:
                    decide(f"-d {cidr} ", "RETURN", f"A{index}")
            for resolver in _of_family(policy.resolvers, family):
                for protocol in ("udp", "tcp"):
                    decide(f"-d {resolver} -p {protocol} -m {protocol} --dport {DNS_PORT} ", "RETURN", "AD")
        decide("", policy.reject_chain, "D")
        prefix = 32 if family == 4 else 128
        for host in sorted(hosts):
            comment = f'-m comment --comment "{SANDBOX_COMMENT_PREFIX}{sandbox_id}"'
            lines.append(f"-I {dispatch} 1 -s {host}/{prefix} {comment} -j {own}")
    elif own in chains:
        lines.append(f"-X {own}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def apply_sandbox(
    policy: FirewallPolicy,
    sandbox_id: str,
    addresses: Sequence[str],
    egress: SandboxEgress | None,
    commands: Commands = Commands(),
    lock_file: Path = LOCK_FILE,
) -> None:
    """Give one sandbox its egress policy, or remove it (`egress` None); idempotent, blocking (call it from
    a thread). An address of a family without a firewall (IPv6 off) is skipped. Raises FirewallError."""
    families: list[tuple[Family, str, str]] = [(4, "iptables-save", "iptables-restore")]
    if ipv6_enabled(commands):
        families.append((6, "ip6tables-save", "ip6tables-restore"))
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for family, save, restore in families:
            of_family = [a for a in addresses if ipaddress.ip_address(a).version == family]
            current = commands.run([save, "-t", "filter"])
            rendered = render_sandbox(policy, family, sandbox_id, of_family, egress, current)
            commands.run([restore, "-w", "--noflush"], stdin=rendered)
    log.info(
        "firewall.sandbox_applied",
        sandbox_id=sandbox_id,
        addresses=list(addresses),
        block_all=egress.block_all if egress else None,
        allowed=list(egress.allowed) if egress else None,
    )


def read_sandbox_policies(
    policy: FirewallPolicy, commands: Commands = Commands()
) -> dict[str, tuple[str, ...]]:
    """The sandboxes that have a policy on this host now (see `sandboxes_with_policies`); blocking."""
    return sandboxes_with_policies(policy, commands.run(["iptables-save", "-t", "filter"]))
