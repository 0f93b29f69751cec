"""The flow log's netlink side: config requests out, NFLOG packet messages in, and what the runner makes of
them (the kernel end is exercised by tests/integration/test_network_policies_sdk.py)."""

from __future__ import annotations

import asyncio
import socket
import struct
from datetime import UTC, datetime

from tidepool_contracts.models import SandboxSpec
from tidepool_runner import firewall
from tidepool_runner.egress import EgressPolicies
from tidepool_runner.flowlog import LoggedPacket, config_message, parse_ip, parse_messages
from tidepool_runtime.settings import RunnerSettings


def attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def packet_message(prefix: str, payload: bytes, stamp: tuple[int, int] | None = None) -> bytes:
    attributes = attribute(10, prefix.encode() + b"\0") + attribute(9, payload)
    if stamp is not None:
        attributes += attribute(3, struct.pack(">QQ", *stamp))
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(7100)) + attributes
    return struct.pack("=IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body


def ipv4_tcp_syn(source: str, destination: str, port: int) -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        40,
        1,
        0,
        64,
        6,
        0,
        socket.inet_aton(source),
        socket.inet_aton(destination),
    )
    return header + struct.pack(">HHIIBBHHH", 40000, port, 0, 0, 0x50, 0x02, 1024, 0, 0)


def ipv6_udp(source: str, destination: str, port: int) -> bytes:
    header = struct.pack(">IHBB", 6 << 28, 8, 17, 64)
    header += socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination)
    return header + struct.pack(">HHHH", 5353, port, 8, 0)


def test_a_config_request_names_the_group_big_endian_and_asks_for_an_ack() -> None:
    message = config_message(7100, [attribute(1, b"\x01")], sequence=3)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", message)
    assert length == len(message) == 16 + 4 + 8
    assert kind == (4 << 8) | 1 and flags == 0x1 | 0x4 and sequence == 3
    assert message[16:20] == bytes([socket.AF_UNSPEC, 0]) + (7100).to_bytes(2, "big")


def test_packets_give_destination_port_protocol_and_time_and_errors_their_code() -> None:
    stamp = (1_700_000_000, 500_000)
    syn = packet_message("TPF 0a1b2c3d D", ipv4_tcp_syn("10.90.0.7", "151.101.0.223", 443), stamp)
    udp = packet_message("TPF 0a1b2c3d AD", ipv6_udp("fd00::7", "2a04:4e42::223", 53))
    foreign = packet_message("someone else", ipv4_tcp_syn("10.0.0.1", "10.0.0.2", 22))
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -16) + b"\0" * 16
    packets, errors = parse_messages(syn + udp + foreign + error)
    assert errors == [16]
    assert [(p.prefix, p.protocol, p.source, p.destination, p.port) for p in packets] == [
        ("TPF 0a1b2c3d D", "tcp", "10.90.0.7", "151.101.0.223", 443),
        ("TPF 0a1b2c3d AD", "udp", "fd00::7", "2a04:4e42::223", 53),
    ]
    assert packets[0].time == datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=UTC)
    # ICMP has no port; a truncated packet is no flow.
    ping = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 1, 0, b"\n\x5a\0\7", b"\x08\x08\x08\x08")
    assert parse_ip(ping + b"\x08\0\0\0\0\0\0\0") == ("icmp", "10.90.0.7", "8.8.8.8", None)
    assert parse_ip(b"\x45\0") is None


def test_the_runner_names_the_sandbox_and_the_rule_of_each_logged_packet() -> None:
    async def run() -> None:
        egress = EgressPolicies(RunnerSettings(sandbox_firewall=False))
        egress.flow_log_group = 7100
        spec = SandboxSpec(
            sandbox_id="sbx-5",
            organization_id="org",
            image="alpine",
            network_allow_list=["151.101.0.0/16", "151.101.0.0/16"],
        )
        policy, described = await egress._egress_of(spec)
        assert policy.log_group == 7100 and policy.allowed == ("151.101.0.0/16",)
        assert policy.generation is not None
        egress._describe("sbx-5", policy, described)
        now = datetime.now(UTC)

        def flow(decision: str, generation: int | None = policy.generation):  # type: ignore[no-untyped-def]
            prefix = firewall.flow_prefix("sbx-5", decision, generation)
            return egress.flow_of(LoggedPacket(prefix, now, "tcp", "10.90.0.7", "151.101.0.1", 443), "r1")

        allowed = flow("A0")
        assert allowed is not None and allowed.sandbox_id == "sbx-5" and allowed.verdict == "allowed"
        assert allowed.rule == "networkAllowList 151.101.0.0/16" and allowed.port == 443
        denied = flow("D")
        assert denied is not None and denied.verdict == "denied"
        assert denied.rule == "not in networkAllowList or domainAllowList"
        assert flow("A1") is None  # no such rule
        assert flow("A0", None) is None  # a prefix without its policy's generation is not ours
        assert egress.flow_of(LoggedPacket("TPF ffffffff D 1", now, "tcp", "a", "b", 1), "r1") is None

        # The policy changes: the packets the old rules logged around the change still read as the old rules
        # (allowed by the list, then denied as block-all), the new rules' as the new ones; two changes later
        # the first generation is forgotten.
        block_all = spec.model_copy(update={"network_block_all": True})
        blocked, blocked_described = await egress._egress_of(block_all)
        assert blocked.block_all and blocked_described[1] == "networkBlockAll"
        assert blocked.generation is not None and blocked.generation > policy.generation
        egress._describe("sbx-5", blocked, blocked_described)
        old_allowed = flow("A0")
        assert old_allowed is not None and old_allowed.rule == "networkAllowList 151.101.0.0/16"
        new_denied = flow("D", blocked.generation)
        assert new_denied is not None and new_denied.rule == "networkBlockAll"
        again, again_described = await egress._egress_of(spec)
        egress._describe("sbx-5", again, again_described)
        assert flow("A0") is None and flow("D", blocked.generation) is not None

    asyncio.run(run())
