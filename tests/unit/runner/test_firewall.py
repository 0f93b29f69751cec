"""Rendering the sandbox firewall: settings (and the table as it is) in, iptables-restore text out."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidepool_runner.firewall import (
    BLOCKED_IPV4,
    BLOCKED_IPV6,
    FirewallError,
    FirewallPolicy,
    SandboxEgress,
    host_resolvers,
    policy_from_settings,
    render,
    render_sandbox,
    sandbox_chain,
    sandbox_tag,
    sandboxes_with_policies,
)
from tidepool_runtime.settings import Settings

JUMP = '-m comment --comment "tidepool sandbox isolation"'


def rules_of(text: str, chain: str) -> list[str]:
    """The `-A chain …` specs in order (without `-A chain`)."""
    prefix = f"-A {chain} "
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


def test_empty_table_gets_every_chain_and_one_jump_per_hook() -> None:
    text = render(FirewallPolicy(bridge="tidepool0", resolvers=("10.255.255.53",)), 4)
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    declared = [line.split()[0][1:] for line in lines if line.startswith(":")]
    assert sorted(declared) == sorted(
        [
            "TIDEPOOL-REJECT",
            "TIDEPOOL-EGRESS",
            "TIDEPOOL-INPUT",
            "TIDEPOOL-FORWARD",
            "TIDEPOOL-SANDBOXES",
            "CNI-ADMIN",
        ]
    )
    assert not any(line.startswith("-D ") for line in lines)
    jumps = [line for line in lines if line.startswith("-I ")]
    assert jumps == [
        f"-I INPUT 1 -i tidepool0 {JUMP} -j TIDEPOOL-INPUT",
        f"-I FORWARD 1 -o tidepool0 {JUMP} -j TIDEPOOL-FORWARD",
        f"-I FORWARD 1 -i tidepool0 {JUMP} -j TIDEPOOL-FORWARD",
        f"-I CNI-ADMIN 1 -o tidepool0 {JUMP} -j TIDEPOOL-FORWARD",
        f"-I CNI-ADMIN 1 -i tidepool0 {JUMP} -j TIDEPOOL-FORWARD",
    ]


def test_default_policy_rejects_host_other_sandboxes_and_private_ranges_but_allows_dns_and_internet() -> None:
    text = render(FirewallPolicy(bridge="tidepool0", resolvers=("10.255.255.53",)), 4)
    assert rules_of(text, "TIDEPOOL-REJECT") == [
        "-p tcp -j REJECT --reject-with tcp-reset",  # connect() fails at once with "refused"
        "-j REJECT --reject-with icmp-admin-prohibited",
    ]
    assert rules_of(text, "TIDEPOOL-INPUT") == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-j TIDEPOOL-SANDBOXES",  # a sandbox's own policy narrows what reaches the host too (DNS)
        "-d 10.255.255.53 -p udp -m udp --dport 53 -j RETURN",
        "-d 10.255.255.53 -p tcp -m tcp --dport 53 -j RETURN",
        "-j TIDEPOOL-REJECT",
    ]
    assert rules_of(text, "TIDEPOOL-FORWARD") == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "! -i tidepool0 -j TIDEPOOL-REJECT",  # new connections into the bridge from elsewhere
        "-o tidepool0 -j TIDEPOOL-REJECT",  # sandbox to sandbox
        "-j TIDEPOOL-SANDBOXES",  # per-sandbox policies come before the default one
        "-j TIDEPOOL-EGRESS",
    ]
    egress = rules_of(text, "TIDEPOOL-EGRESS")
    assert egress[:2] == [
        "-d 10.255.255.53 -p udp -m udp --dport 53 -j ACCEPT",
        "-d 10.255.255.53 -p tcp -m tcp --dport 53 -j ACCEPT",
    ]
    assert egress[2:-1] == [f"-d {cidr} -j TIDEPOOL-REJECT" for cidr in BLOCKED_IPV4]
    assert egress[-1] == "-j ACCEPT"
    assert "169.254.0.0/16" in BLOCKED_IPV4 and "10.0.0.0/8" in BLOCKED_IPV4


def test_operator_widening_allowed_cidrs_and_inter_sandbox() -> None:
    policy = FirewallPolicy(
        bridge="tp1",
        allowed_cidrs=("10.1.2.0/24", "fd00:1::/64", "192.0.2.2/32"),
        allow_inter_sandbox=True,
    )
    text = render(policy, 4)
    assert "-o tp1 -j ACCEPT" in rules_of(text, "TIDEPOOL-FORWARD")
    egress = rules_of(text, "TIDEPOOL-EGRESS")
    # Allowed before blocked, so a private allowed range wins; the host is reachable on an allowed address.
    assert egress[:2] == ["-d 10.1.2.0/24 -j ACCEPT", "-d 192.0.2.2/32 -j ACCEPT"]
    assert rules_of(text, "TIDEPOOL-INPUT")[2:4] == ["-d 10.1.2.0/24 -j RETURN", "-d 192.0.2.2/32 -j RETURN"]
    assert "fd00:1::/64" not in text
    assert "-d fd00:1::/64 -j ACCEPT" in rules_of(render(policy, 6), "TIDEPOOL-EGRESS")


def test_ipv6_rules_block_link_local_and_private_ranges_and_let_neighbour_discovery_reach_the_host() -> None:
    policy = FirewallPolicy(bridge="tidepool0", resolvers=("10.255.255.53", "fd00::53"))
    text = render(policy, 6)
    assert "10.255.255.53" not in text
    assert rules_of(text, "TIDEPOOL-REJECT")[-1] == "-j REJECT --reject-with icmp6-adm-prohibited"
    inp = rules_of(text, "TIDEPOOL-INPUT")
    assert "-p ipv6-icmp -m icmp6 --icmpv6-type neighbour-solicitation -j RETURN" in inp
    assert "-d fd00::53 -p udp -m udp --dport 53 -j RETURN" in inp
    assert inp[-1] == "-j TIDEPOOL-REJECT"
    # Between sandboxes only address resolution passes, so a connect is rejected rather than left hanging.
    assert rules_of(text, "TIDEPOOL-FORWARD")[2:5] == [
        "-o tidepool0 -p ipv6-icmp -m icmp6 --icmpv6-type neighbour-solicitation -j ACCEPT",
        "-o tidepool0 -p ipv6-icmp -m icmp6 --icmpv6-type neighbour-advertisement -j ACCEPT",
        "-o tidepool0 -j TIDEPOOL-REJECT",
    ]
    egress = rules_of(text, "TIDEPOOL-EGRESS")
    assert [f"-d {cidr} -j TIDEPOOL-REJECT" for cidr in BLOCKED_IPV6] == egress[2:-1]
    assert {"fe80::/10", "fc00::/7", "::1/128"} <= set(BLOCKED_IPV6)


def test_reapplying_deletes_every_existing_jump_and_keeps_per_sandbox_and_foreign_rules() -> None:
    current = "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [0:0]",
            ":CNI-ADMIN - [0:0]",
            ":CNI-FORWARD - [0:0]",
            ":TIDEPOOL-FORWARD - [0:0]",
            ":TIDEPOOL-INPUT - [0:0]",
            ":TIDEPOOL-SANDBOXES - [0:0]",
            ":TIDEPOOL-SB-1 - [0:0]",
            f"-A INPUT -i tidepool0 {JUMP} -j TIDEPOOL-INPUT",
            f"-A INPUT -i tidepool0 {JUMP} -j TIDEPOOL-INPUT",  # a duplicate, e.g. from a crashed apply
            "-A INPUT -i eth0 -j ACCEPT",
            '-A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD',
            "-A FORWARD -i oldbridge -j TIDEPOOL-FORWARD",  # ours, with an older bridge name
            "-A CNI-ADMIN -s 192.0.2.7/32 -j ACCEPT",  # another admin's override
            f"-A CNI-ADMIN -i tidepool0 {JUMP} -j TIDEPOOL-FORWARD",
            "-A TIDEPOOL-SANDBOXES -s 10.90.0.5/32 -j TIDEPOOL-SB-1",
            "COMMIT",
        ]
    )
    text = render(FirewallPolicy(bridge="tidepool0"), 4, current)
    deletions = [line for line in text.splitlines() if line.startswith("-D ")]
    assert deletions == [
        f"-D INPUT -i tidepool0 {JUMP} -j TIDEPOOL-INPUT",
        f"-D INPUT -i tidepool0 {JUMP} -j TIDEPOOL-INPUT",
        "-D FORWARD -i oldbridge -j TIDEPOOL-FORWARD",
        f"-D CNI-ADMIN -i tidepool0 {JUMP} -j TIDEPOOL-FORWARD",
    ]
    # Declaring a chain empties it: never the dispatch chain with its per-sandbox jumps, nor CNI-ADMIN.
    assert ":TIDEPOOL-SANDBOXES - [0:0]" not in text
    assert ":CNI-ADMIN - [0:0]" not in text
    assert ":TIDEPOOL-FORWARD - [0:0]" in text
    assert "-j CNI-FORWARD" not in text and "192.0.2.7" not in text and "TIDEPOOL-SB-1" not in text
    assert sum(line.startswith("-I INPUT ") for line in text.splitlines()) == 1


def test_chain_prefix_separates_policies() -> None:
    text = render(FirewallPolicy(bridge="tptest0", chain_prefix="TPTEST"), 4)
    assert "TIDEPOOL" not in text
    assert f"-I INPUT 1 -i tptest0 {JUMP} -j TPTEST-INPUT" in text


@pytest.mark.parametrize(
    "fields",
    [
        {"bridge": "tidepool0 -j ACCEPT"},
        {"bridge": "a-bridge-name-too-long"},
        {"bridge": ""},
        {"bridge": "tidepool0", "resolvers": ("dns.example",)},
        {"bridge": "tidepool0", "allowed_cidrs": ("10.0.0.0/8 -j ACCEPT",)},
        {"bridge": "tidepool0", "chain_prefix": "tp"},
    ],
)
def test_invalid_policy_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(FirewallError):
        FirewallPolicy(**fields)  # type: ignore[arg-type]


def test_policy_from_settings_prefers_configured_dns_servers(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        sandbox_network_bridge="tp9",
        sandbox_allowed_cidrs=["10.1.0.0/16"],
        sandbox_allow_inter_sandbox=True,
    )
    policy = policy_from_settings(settings, ["10.255.255.53"])
    assert policy == FirewallPolicy(
        bridge="tp9",
        resolvers=("10.255.255.53",),
        allowed_cidrs=("10.1.0.0/16",),
        allow_inter_sandbox=True,
    )
    configured = settings.model_copy(update={"sandbox_dns_servers": ["192.168.1.53"]})
    assert policy_from_settings(configured, ["10.255.255.53"]).resolvers == ("192.168.1.53",)


def test_host_resolvers_skip_loopback_and_fall_back_to_systemd_resolved(tmp_path: Path) -> None:
    stub, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    stub.write_text("# stub\nnameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("nameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\nsearch x\n")
    assert host_resolvers([stub, upstream]) == ("10.0.0.2", "fe80::1")
    assert host_resolvers([tmp_path / "missing", stub]) == ()
    stub.write_text("nameserver 10.255.255.53\n")
    assert host_resolvers([stub, upstream]) == ("10.255.255.53",)


# ----- per-sandbox egress policies -----------------------------------------------------------------------

SANDBOX_POLICY = FirewallPolicy(bridge="tidepool0", resolvers=("10.255.255.53",))


def test_a_sandbox_allow_list_returns_to_the_default_policy_only_for_its_networks_and_dns() -> None:
    egress = SandboxEgress(allowed=("151.101.0.223/32", "2a04:4e42::223/128"))
    chain = sandbox_chain(SANDBOX_POLICY, "sbx-1")
    assert chain.startswith("TIDEPOOL-S-") and len(chain) <= 28
    text = render_sandbox(SANDBOX_POLICY, 4, "sbx-1", ["10.90.0.7"], egress, current="")
    assert f":{chain} - [0:0]" in text and ":TIDEPOOL-SANDBOXES - [0:0]" in text
    assert rules_of(text, chain) == [
        "-d 151.101.0.223/32 -j RETURN",  # back to the default policy, which may still refuse it
        "-d 10.255.255.53 -p udp -m udp --dport 53 -j RETURN",
        "-d 10.255.255.53 -p tcp -m tcp --dport 53 -j RETURN",
        "-j TIDEPOOL-REJECT",
    ]
    assert (
        f'-I TIDEPOOL-SANDBOXES 1 -s 10.90.0.7/32 -m comment --comment "tidepool sandbox sbx-1" -j {chain}'
        in (text.splitlines())
    )
    # IPv6: only the v6 networks of the list; an address of the sandbox is needed to key the rule.
    six = render_sandbox(SANDBOX_POLICY, 6, "sbx-1", ["fd00::7"], egress, current="")
    assert rules_of(six, chain) == ["-d 2a04:4e42::223/128 -j RETURN", "-j TIDEPOOL-REJECT"]


def test_block_all_rejects_even_dns_and_a_reused_address_loses_the_previous_sandboxs_rule() -> None:
    chain = sandbox_chain(SANDBOX_POLICY, "sbx-2")
    old = sandbox_chain(SANDBOX_POLICY, "sbx-old")
    current = "\n".join(
        [
            "*filter",
            ":TIDEPOOL-SANDBOXES - [0:0]",
            f":{old} - [0:0]",
            f'-A TIDEPOOL-SANDBOXES -s 10.90.0.8/32 -m comment --comment "tidepool sandbox sbx-old" -j {old}',
            f"-A {old} -j TIDEPOOL-REJECT",
            "COMMIT",
        ]
    )
    assert sandboxes_with_policies(SANDBOX_POLICY, current) == {"sbx-old": ("10.90.0.8",)}
    text = render_sandbox(SANDBOX_POLICY, 4, "sbx-2", ["10.90.0.8"], SandboxEgress(block_all=True), current)
    lines = text.splitlines()
    assert ":TIDEPOOL-SANDBOXES - [0:0]" not in lines  # the dispatch chain is never emptied
    assert (
        f'-D TIDEPOOL-SANDBOXES -s 10.90.0.8/32 -m comment --comment "tidepool sandbox sbx-old" -j {old}'
        in lines
    )
    assert f"-X {old}" in lines  # the previous sandbox's chain, used by nothing any more
    assert rules_of(text, chain) == ["-j TIDEPOOL-REJECT"]


def test_removing_a_sandbox_policy_deletes_its_jumps_and_its_chain() -> None:
    chain = sandbox_chain(SANDBOX_POLICY, "sbx-3")
    current = "\n".join(
        [
            "*filter",
            ":TIDEPOOL-SANDBOXES - [0:0]",
            f":{chain} - [0:0]",
            f'-A TIDEPOOL-SANDBOXES -s 10.90.0.9/32 -m comment --comment "tidepool sandbox sbx-3" -j {chain}',
            f"-A {chain} -j TIDEPOOL-REJECT",
            "COMMIT",
        ]
    )
    lines = render_sandbox(SANDBOX_POLICY, 4, "sbx-3", [], None, current).splitlines()
    assert lines == [
        "*filter",
        f":{chain} - [0:0]",
        f'-D TIDEPOOL-SANDBOXES -s 10.90.0.9/32 -m comment --comment "tidepool sandbox sbx-3" -j {chain}',
        f"-X {chain}",
        "COMMIT",
    ]
    with pytest.raises(FirewallError):
        render_sandbox(SANDBOX_POLICY, 4, "bad id; -j ACCEPT", [], None, "")


def test_with_a_flow_log_each_decision_is_logged_first_with_its_rule() -> None:
    egress = SandboxEgress(allowed=("151.101.0.223/32", "2a04:4e42::223/128"), log_group=7100)
    chain = sandbox_chain(SANDBOX_POLICY, "sbx-4")
    tag = sandbox_tag("sbx-4")
    text = render_sandbox(SANDBOX_POLICY, 4, "sbx-4", ["10.90.0.10"], egress, current="")
    limit = "-m limit --limit 50/second --limit-burst 200"

    def logged(match: str, decision: str) -> str:
        return f'{match}{limit} -j NFLOG --nflog-group 7100 --nflog-prefix "TPF {tag} {decision}"'

    assert rules_of(text, chain) == [
        logged("-d 151.101.0.223/32 ", "A0"),
        "-d 151.101.0.223/32 -j RETURN",
        logged("-d 10.255.255.53 -p udp -m udp --dport 53 ", "AD"),
        "-d 10.255.255.53 -p udp -m udp --dport 53 -j RETURN",
        logged("-d 10.255.255.53 -p tcp -m tcp --dport 53 ", "AD"),
        "-d 10.255.255.53 -p tcp -m tcp --dport 53 -j RETURN",
        logged("", "D"),
        "-j TIDEPOOL-REJECT",
    ]
    # The index is the network's place in `allowed`, whatever the family.
    six = render_sandbox(SANDBOX_POLICY, 6, "sbx-4", ["fd00::7"], egress, current="")
    assert rules_of(six, chain)[:2] == [
        logged("-d 2a04:4e42::223/128 ", "A1"),
        "-d 2a04:4e42::223/128 -j RETURN",
    ]
    blocked = SandboxEgress(block_all=True, log_group=7100)
    assert rules_of(render_sandbox(SANDBOX_POLICY, 4, "sbx-4", ["10.90.0.10"], blocked, ""), chain) == [
        logged("", "D"),
        "-j TIDEPOOL-REJECT",
    ]
