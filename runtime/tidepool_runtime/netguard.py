"""Which addresses a tenant-supplied destination (a webhook URL, an organization's OTLP endpoint) may reach.

A tenant must not make a platform service send requests inside the operator's network (SSRF): only public
addresses are reachable, except the networks the operator allows (`TIDEPOOL_TENANT_ENDPOINT_ALLOWED_CIDRS`).
Not public: loopback, RFC 1918 and IPv6 unique-local, link-local (169.254/16: cloud metadata; fe80::/10),
CGNAT (100.64/10), multicast, unspecified, reserved and documentation ranges, and IPv6 forms that embed
such an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible, 6to4, NAT64 `64:ff9b::/96`). The
classification is the standard library's (`ipaddress` `is_global` and friends), not a range list of ours.

Checked twice: when the destination is saved (`check_host`: every address its name resolves to), and,
for the HTTP clients that allow it, at connect time on the address actually connected to
(`guarded_socket_factory`), so a name that resolves elsewhere later (DNS rebinding) is refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


class BlockedAddressError(ConnectionRefusedError):
    """A destination that resolves to an address outside the public internet and the operator's allow-list.

    An OSError (ConnectionRefusedError), so HTTP clients treat it as a connection that failed."""


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """`["10.1.0.0/16", "fd00::/8", "127.0.0.1"]` as networks (a bare address is a /32 or /128).

    Raises ValueError for an entry that is not an IPv4 or IPv6 network."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _kind(address: IPAddress) -> str | None:
    """Why `address` is not public (a short phrase), None when it is."""
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata and the like)"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "shared address space (CGNAT 100.64.0.0/10)"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private (RFC 1918, unique-local) or special-purpose"
    if not address.is_global:
        return "not globally routable"
    return None


def refusal(address: str | IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """None when `address` may be reached, else why not: `"127.0.0.1 is not a public address (loopback)"`.

    `allowed`: the operator's exceptions; an IPv6 address embedding an IPv4 one is allowed when either is,
    and is judged by the IPv4 address (what a connection to it reaches).
    Raises ValueError for text that is not an IP address."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (`fe80::1%eth0`)
    inner = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if any(candidate in network for candidate in (address, inner) if candidate for network in allowed):
        return None
    if inner is not None:  # what a connection to it reaches
        kind = _kind(inner)
        return None if kind is None else f"{address} embeds {inner}, not a public address ({kind})"
    kind = _kind(address)
    return None if kind is None else f"{address} is not a public address ({kind})"


async def resolve(host: str, port: int | None) -> list[str]:
    """The addresses `host` resolves to (an IP literal is itself). Raises OSError (socket.gaierror) when it
    does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def check_host(host: str, port: int | None, allowed: Sequence[IPNetwork] = ()) -> None:
    """Refuse a destination host unless every address it resolves to is public or allowed.

    Raises BlockedAddressError (the reason: which address, and what kind it is) or, for a name that does
    not resolve, OSError."""
    literal = host.strip("[]")
    try:
        addresses = [str(ipaddress.ip_address(literal.split("%", 1)[0]))]
    except ValueError:
        addresses = await resolve(host, port)
    for address in addresses:
        reason = refusal(address, allowed)
        if reason is not None:
            prefix = "" if address == literal else f"{host} resolves to "
            raise BlockedAddressError(f"{prefix}{reason}")


def guarded_socket_factory(allowed: Sequence[IPNetwork] = ()) -> Callable[[Any], socket.socket]:
    """For aiohttp's `TCPConnector(socket_factory=...)`: opens the socket for one resolved address
    `(family, type, proto, canonname, sockaddr)`, or raises BlockedAddressError when that address is not
    public. It sees the address actually connected to, IP literals and freshly resolved names alike."""

    def factory(addr_info: Any) -> socket.socket:
        family, type_, proto, _canonname, sockaddr = addr_info
        reason = refusal(str(sockaddr[0]), allowed)
        if reason is not None:
            raise BlockedAddressError(f"refused to connect: {reason}")
        return socket.socket(family=family, type=type_, proto=proto)

    return factory
