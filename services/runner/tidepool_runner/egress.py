"""Per-sandbox egress policies (behaviour spec §5 "network-limits"): `networkBlockAll`, `networkAllowList`
(IPv4 CIDRs) and `domainAllowList`, enforced by the host firewall (`firewall.apply_sandbox`) and changeable on
a running sandbox without a restart.

A policy only narrows the runner's default policy (private ranges, the host and other sandboxes stay
unreachable whatever a list says). The rules are keyed on the container's addresses and are in place before
its first process runs (`ContainerEngine.initialize` assigns them first). Domains are enforced for real, as
the addresses they resolve to on the runner (with the runner host's resolver: where the sandboxes are given
other DNS servers, `TIDEPOOL_SANDBOX_DNS_SERVERS`, a split-horizon name may resolve differently for them),
re-resolved every `sandbox_domain_refresh_seconds`; a `*.example.com` entry allows the addresses of
`example.com` itself (subdomains are not enumerable from DNS: list the ones you need).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
from collections.abc import Iterable

import structlog

from tidepool_contracts.models import SandboxFlow, SandboxSpec
from tidepool_runner import firewall
from tidepool_runner.engine import SandboxFailedError
from tidepool_runner.flowlog import LoggedPacket
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.egress")


class EgressPolicies:
    """What this runner's sandboxes may reach, beyond the default policy. Blocking firewall calls run in
    threads; calls for one sandbox come from its jobs, under its lock."""

    def __init__(self, settings: RunnerSettings) -> None:
        self._settings = settings
        self._policy: firewall.FirewallPolicy | None = None
        # Sandboxes with rules on this host -> the addresses the rules are keyed on.
        self._applied: dict[str, tuple[str, ...]] = {}
        # Sandboxes with a domain allow list -> (spec, addresses), re-resolved periodically.
        self._domains: dict[str, tuple[SandboxSpec, tuple[str, ...]]] = {}
        self._lock = asyncio.Lock()
        # The flow log's NFLOG group (flowlog.py), once open; rules applied from then on log to it.
        self.flow_log_group: int | None = None
        # Flow-log tag (firewall.sandbox_tag) -> (sandbox id, {policy generation: what its rules are:
        # allowed[n], denial}), the latest generations only. Registered before the rules are applied, and the
        # previous one kept: a packet logged at the moment of a change is read with the rules that logged it.
        self._rules: dict[str, tuple[str, dict[int, tuple[tuple[str, ...], str]]]] = {}
        self._generations = itertools.count(1)

    def _firewall(self) -> firewall.FirewallPolicy:
        if self._policy is None:
            self._policy = firewall.policy_from_settings(self._settings, firewall.host_resolvers())
        return self._policy

    async def load(self, running: Iterable[str]) -> None:
        """At start-up: learn which sandboxes have rules (from the firewall itself) and drop the rules of
        those not in `running` (ended while the runner was away: their addresses will be reused)."""
        if not self._settings.sandbox_firewall:
            return
        policy = self._firewall()
        found = await asyncio.to_thread(firewall.read_sandbox_policies, policy)
        alive = set(running)
        for sandbox_id, addresses in found.items():
            if sandbox_id in alive:
                self._applied[sandbox_id] = addresses
            else:
                await asyncio.to_thread(firewall.apply_sandbox, policy, sandbox_id, addresses, None)

    @staticmethod
    def has_policy(spec: SandboxSpec) -> bool:
        return spec.network_block_all or bool(spec.network_allow_list or spec.domain_allow_list)

    async def converge(self, spec: SandboxSpec, addresses: tuple[str, ...]) -> None:
        """Give the sandbox (its container at `addresses`) the policy of `spec`, or none. Raises
        SandboxFailedError when a policy is asked for and cannot be enforced."""
        sandbox_id = spec.sandbox_id
        wanted = self.has_policy(spec)
        if wanted and not self._settings.sandbox_firewall:
            raise SandboxFailedError(
                "network policies (networkBlockAll, networkAllowList, domainAllowList) need the runner's "
                "sandbox firewall, which is turned off on this runner (TIDEPOOL_SANDBOX_FIREWALL)"
            )
        if not self._settings.sandbox_firewall:
            return
        async with self._lock:
            # Rules of another sandbox on an address this one now has: it ended without a stop job.
            taken = set(addresses)
            for other, keyed in list(self._applied.items()):
                if other != sandbox_id and taken & set(keyed):
                    await self._remove_locked(other)
            if not wanted:
                self._domains.pop(sandbox_id, None)
                if sandbox_id in self._applied:
                    await self._remove_locked(sandbox_id)
                return
            if not addresses:
                raise SandboxFailedError("the sandbox has no network address to apply its network policy to")
            egress, described = await self._egress_of(spec)
            self._describe(sandbox_id, egress, described)
            await self._apply(sandbox_id, addresses, egress)
            if spec.domain_allow_list and not spec.network_block_all:
                self._domains[sandbox_id] = (spec, addresses)
            else:
                self._domains.pop(sandbox_id, None)

    async def remove(self, sandbox_id: str) -> None:
        """The sandbox's container stopped or is gone: its rules go (its addresses are free for reuse)."""
        async with self._lock:
            self._domains.pop(sandbox_id, None)
            if sandbox_id in self._applied:
                await self._remove_locked(sandbox_id)

    async def refresh_forever(self) -> None:
        """Re-resolve domain allow lists and update the rules whose addresses changed."""
        while True:
            await asyncio.sleep(self._settings.sandbox_domain_refresh_seconds)
            for sandbox_id, (spec, addresses) in list(self._domains.items()):
                try:
                    egress, described = await self._egress_of(spec)
                    async with self._lock:
                        if self._domains.get(sandbox_id, (None,))[0] is spec:
                            self._describe(sandbox_id, egress, described)
                            await self._apply(sandbox_id, addresses, egress)
                except Exception as error:  # keep the previous rules; try again next round
                    log.warning("egress.refresh_failed", sandbox_id=sandbox_id, error=str(error))

    def _describe(
        self, sandbox_id: str, egress: firewall.SandboxEgress, described: tuple[tuple[str, ...], str]
    ) -> None:
        """Remember what the flow-log prefixes of `egress` mean (its generation and the one before it)."""
        assert egress.generation is not None
        tag = firewall.sandbox_tag(sandbox_id)
        known = self._rules[tag][1] if tag in self._rules else {}
        latest = max(known, default=None)
        kept = {latest: known[latest]} if latest is not None else {}
        self._rules[tag] = (sandbox_id, {**kept, egress.generation: described})

    async def _apply(
        self, sandbox_id: str, addresses: tuple[str, ...], egress: firewall.SandboxEgress
    ) -> None:
        try:
            await asyncio.to_thread(firewall.apply_sandbox, self._firewall(), sandbox_id, addresses, egress)
        except firewall.FirewallError as error:
            raise SandboxFailedError(f"the sandbox's network policy could not be applied: {error}") from None
        self._applied[sandbox_id] = addresses

    async def _remove_locked(self, sandbox_id: str) -> None:
        addresses = self._applied.pop(sandbox_id, ())
        self._rules.pop(firewall.sandbox_tag(sandbox_id), None)
        try:
            await asyncio.to_thread(firewall.apply_sandbox, self._firewall(), sandbox_id, addresses, None)
        except firewall.FirewallError as error:
            log.warning("egress.remove_failed", sandbox_id=sandbox_id, error=str(error))

    def flow_of(self, packet: LoggedPacket, runner_id: str) -> SandboxFlow | None:
        """The flow-log entry of a packet the sandbox chains logged; None if not of a sandbox known here."""
        parts = packet.prefix.split()
        if len(parts) != 4 or parts[1] not in self._rules or not parts[3].isdigit():
            return None
        sandbox_id, generations = self._rules[parts[1]]
        if int(parts[3]) not in generations:
            return None
        allowed, denial = generations[int(parts[3])]
        decision = parts[2]
        if decision == "D":
            verdict, rule = "denied", denial
        elif decision == "AD":
            verdict, rule = "allowed", "dns"
        elif decision.startswith("A") and decision[1:].isdigit() and int(decision[1:]) < len(allowed):
            verdict, rule = "allowed", allowed[int(decision[1:])]
        else:
            return None
        return SandboxFlow(
            sandbox_id=sandbox_id,
            runner_id=runner_id,
            time=packet.time,
            protocol=packet.protocol,
            source=packet.source,
            destination=packet.destination,
            port=packet.port,
            verdict=verdict,
            rule=rule,
        )

    async def _egress_of(
        self, spec: SandboxSpec
    ) -> tuple[firewall.SandboxEgress, tuple[tuple[str, ...], str]]:
        """The firewall's egress policy for `spec`, and for the flow log what each allowed network is (by
        index) and what a denial means."""
        if spec.network_block_all:
            egress = firewall.SandboxEgress(
                block_all=True, log_group=self.flow_log_group, generation=next(self._generations)
            )
            return egress, (
                (),
                "networkBlockAll",
            )
        rules: dict[str, str] = {}
        for cidr in spec.network_allow_list:
            network = str(ipaddress.IPv4Network(cidr, strict=False))
            rules.setdefault(network, f"networkAllowList {cidr}")
        for domain in spec.domain_allow_list:
            for network in await _resolve(domain.removeprefix("*.")):
                rules.setdefault(network, f"domainAllowList {domain}")
        egress = firewall.SandboxEgress(
            allowed=tuple(rules), log_group=self.flow_log_group, generation=next(self._generations)
        )
        return egress, (tuple(rules.values()), "not in networkAllowList or domainAllowList")


async def _resolve(domain: str) -> list[str]:
    """The addresses `domain` resolves to, as host networks; none if it does not resolve (then nothing of
    it is reachable, which is what an allow list means)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(domain, None, type=socket.SOCK_STREAM)
    except OSError as error:
        log.warning("egress.domain_unresolved", domain=domain, error=str(error))
        return []
    networks = []
    for family, *_rest, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        networks.append(f"{address}/{32 if family == socket.AF_INET else 128}")
    return networks
