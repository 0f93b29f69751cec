"""tidepool_runtime.netguard: which addresses tenants' destinations (webhooks, OTLP) may reach."""

from __future__ import annotations

import socket

import pytest

from tidepool_runtime import netguard
from tidepool_runtime.netguard import BlockedAddressError, check_host, guarded_socket_factory, parse_networks
from tidepool_runtime.settings import Settings


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("fec0::1", "site-local"),
        ("192.0.2.1", "special-purpose"),  # documentation
        ("2001:db8::1", "special-purpose"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        # IPv6 forms that reach an IPv4 address: judged by it.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible
        ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused_with_their_kind(address: str, kind: str) -> None:
    reason = netguard.refusal(address)
    assert reason is not None and kind in reason and "not a public address" in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "192.0.0.9"])
def test_public_addresses_pass(address: str) -> None:
    assert netguard.refusal(address) is None


def test_the_operators_networks_are_allowed_also_in_ipv6_form() -> None:
    allowed = parse_networks(["10.1.0.0/16", "127.0.0.1", "fd00:1::/64"])
    for address in ("10.1.2.3", "127.0.0.1", "::ffff:127.0.0.1", "fd00:1::5"):
        assert netguard.refusal(address, allowed) is None
    for address in ("10.2.0.1", "127.0.0.2", "fd00:2::1", "169.254.169.254"):
        assert netguard.refusal(address, allowed) is not None


def test_the_setting_reads_a_list_and_refuses_a_typo() -> None:
    settings = Settings(tenant_endpoint_allowed_cidrs="10.1.0.0/16, 127.0.0.1")  # type: ignore[arg-type]
    assert [str(n) for n in settings.tenant_endpoint_allowed_networks] == ["10.1.0.0/16", "127.0.0.1/32"]
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        Settings(tenant_endpoint_allowed_cidrs=["10.1.0.0/33"])


async def test_check_host_resolves_names_and_judges_every_address() -> None:
    with pytest.raises(BlockedAddressError, match=r"localhost resolves to .*loopback"):
        await check_host("localhost", 80)
    with pytest.raises(BlockedAddressError, match="link-local"):
        await check_host("169.254.169.254", None)
    with pytest.raises(BlockedAddressError, match="loopback"):
        await check_host("[::1]", 443)
    await check_host("8.8.8.8", 443)
    await check_host("localhost", 80, parse_networks(["127.0.0.0/8", "::1"]))
    with pytest.raises(OSError):
        await check_host("no-such-host.invalid", 443)


def test_the_socket_factory_refuses_the_address_it_is_asked_to_connect_to() -> None:
    factory = guarded_socket_factory()
    with pytest.raises(BlockedAddressError, match=r"refused to connect: 127\.0\.0\.1 .*loopback"):
        factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)))
    with pytest.raises(BlockedAddressError, match="loopback"):
        factory((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:127.0.0.1", 80, 0, 0)))
    with factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 443))) as opened:
        assert opened.family == socket.AF_INET
    allowed = guarded_socket_factory(parse_networks(["127.0.0.1"]))
    with allowed((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))) as opened:
        assert opened.type == socket.SOCK_STREAM
