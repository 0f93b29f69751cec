"""The per-sandbox flow log: every new connection (or UDP flow) of a sandbox with a network policy, with the
verdict of its policy and the rule that decided, published on `channels.SANDBOX_FLOWS` (read back by the
API: `GET /api/sandbox/{id}/network/flows`).

The sandbox's own chain (firewall.render_sandbox) sends each new flow it decides to an NFLOG group first,
with the prefix `TPF <tag> <decision> <generation>`; only new flows reach that chain (established traffic is
accepted before it), so one log entry is one flow. This module reads the group from the kernel over an
`nfnetlink_log` netlink socket (the protocol is small and stable; the Python bindings that exist wrap
libnetfilter_log, which hosts don't have, and are unmaintained), parses each packet's IP and TCP/UDP header
for the destination and port; egress.py turns it into a `SandboxFlow` for the bus.

The group is the runner's own: the kernel lets one socket bind a group, so a runner takes the first free one
from `sandbox_flow_log_group` on (several runners, or test stacks, on one host each get theirs), and its rules
name it. NFLOG works in any network namespace, unlike the kernel log's LOG target.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from tidepool_runner.firewall import FLOW_PREFIX

log = structlog.get_logger("tidepool.runner.flowlog")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_TIMESTAMP = 3
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
# IPv6 header (40) + TCP/UDP ports; IPv4's header is at most 60.
COPY_RANGE = 80
RECEIVE_BUFFER = 1 << 20
GROUPS_TRIED = 64
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
WITH_PORTS = {6, 17, 132}
_HEADER = struct.Struct("=IHHII")
_ATTRIBUTE = struct.Struct("=HH")


class FlowLogError(Exception):
    pass


@dataclass(frozen=True)
class LoggedPacket:
    """One packet the kernel logged: its NFLOG prefix and what its headers say."""

    prefix: str
    time: datetime
    protocol: str
    source: str
    destination: str
    port: int | None


def _attribute(kind: int, payload: bytes) -> bytes:
    length = _ATTRIBUTE.size + len(payload)
    return _ATTRIBUTE.pack(length, kind) + payload + b"\0" * (-length % 4)


def config_message(group: int, attributes: list[bytes], sequence: int) -> bytes:
    """An `NFULNL_MSG_CONFIG` request for `group` (nfgenmsg: AF_UNSPEC, version 0, group big-endian)."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + b"".join(attributes)
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, sequence, 0) + body


def _attributes(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTRIBUTE.size <= len(data):
        length, kind = _ATTRIBUTE.unpack_from(data, offset)
        if length < _ATTRIBUTE.size:
            break
        found[kind & 0x3FFF] = data[offset + _ATTRIBUTE.size : offset + length]
        offset += (length + 3) & ~3
    return found


def parse_ip(payload: bytes) -> tuple[str, str, str, int | None] | None:
    """(protocol, source, destination, destination port) of an IPv4 or IPv6 packet's first bytes."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header_length = (payload[0] & 0x0F) * 4
        number = payload[9]
        source = str(ipaddress.IPv4Address(payload[12:16]))
        destination = str(ipaddress.IPv4Address(payload[16:20]))
        transport = payload[header_length:]
    elif version == 6 and len(payload) >= 40:
        number = payload[6]  # extension headers are not followed: their flows log without a port
        source = str(ipaddress.IPv6Address(payload[8:24]))
        destination = str(ipaddress.IPv6Address(payload[24:40]))
        transport = payload[40:]
    else:
        return None
    port = struct.unpack_from(">H", transport, 2)[0] if number in WITH_PORTS and len(transport) >= 4 else None
    return PROTOCOLS.get(number, str(number)), source, destination, port


def parse_messages(data: bytes) -> tuple[list[LoggedPacket], list[int]]:
    """The logged packets and the netlink error codes (0: an acknowledgement) in one `recv`'s data."""
    packets: list[LoggedPacket] = []
    errors: list[int] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, _sequence, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        body = data[offset + _HEADER.size : offset + length]
        offset += (length + 3) & ~3
        if kind == NLMSG_ERROR:
            errors.append(-struct.unpack_from("=i", body)[0])
            continue
        if kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET or len(body) < 4:
            continue
        found = _attributes(body[4:])
        prefix = found.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace")
        parsed = parse_ip(found.get(NFULA_PAYLOAD, b""))
        if parsed is None or not prefix.startswith(FLOW_PREFIX + " "):
            continue
        stamp = found.get(NFULA_TIMESTAMP)
        if stamp is not None and len(stamp) >= 16:
            seconds, microseconds = struct.unpack_from(">QQ", stamp)
            moment = datetime.fromtimestamp(seconds + microseconds / 1e6, UTC)
        else:
            moment = datetime.now(UTC)
        packets.append(LoggedPacket(prefix, moment, *parsed))
    return packets, errors


class NflogSocket:
    """A netlink socket bound to one NFLOG group, copying each packet's headers."""

    def __init__(self, first_group: int) -> None:
        self._first = first_group
        self._socket: socket.socket | None = None
        self.group: int | None = None

    def open(self) -> int:
        """Bind the first free group from `first_group` on; its number. Raises FlowLogError."""
        for group in range(self._first, self._first + GROUPS_TRIED):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
                sock.bind((0, 0))
                sock.settimeout(5.0)
                code = self._configure(sock, group)
            except OSError as error:
                sock.close()
                raise FlowLogError(f"NFLOG netlink socket: {error}") from None
            # A group another socket (another runner on this host) has bound answers EPERM (the kernel's
            # "owned by another peer"); some kernels say EBUSY. Either way: the next group.
            if code in (errno.EBUSY, errno.EPERM):
                sock.close()
                continue
            if code != 0:
                sock.close()
                raise FlowLogError(f"binding NFLOG group {group}: {errno.errorcode.get(code, code)}")
            sock.setblocking(False)
            self._socket, self.group = sock, group
            return group
        last = self._first + GROUPS_TRIED - 1
        raise FlowLogError(f"NFLOG groups {self._first}-{last} are all taken (or not ours to bind)")

    @staticmethod
    def _configure(sock: socket.socket, group: int) -> int:
        requests = [
            [_attribute(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND))],
            [
                _attribute(NFULA_CFG_MODE, struct.pack(">IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0)),
                # Deliver each packet at once (the default batches up to 100 or a second).
                _attribute(NFULA_CFG_QTHRESH, struct.pack(">I", 1)),
            ],
        ]
        for sequence, attributes in enumerate(requests, start=1):
            sock.send(config_message(group, attributes, sequence))
            _, errors = parse_messages(sock.recv(65536))
            if errors and errors[0] != 0:
                return errors[0]
        return 0

    def fileno(self) -> int:
        assert self._socket is not None
        return self._socket.fileno()

    def receive(self) -> list[LoggedPacket]:
        """The packets waiting now (non-blocking); [] when none."""
        assert self._socket is not None
        packets: list[LoggedPacket] = []
        while True:
            try:
                data = self._socket.recv(65536)
            except BlockingIOError:
                return packets
            except OSError as error:
                if error.errno == errno.ENOBUFS:  # the kernel dropped some: keep reading what follows
                    log.warning("flowlog.overrun")
                    continue
                raise
            packets += parse_messages(data)[0]

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


async def read_forever(nflog: NflogSocket, handle: Callable[[LoggedPacket], Awaitable[None]]) -> None:
    """Hand every logged packet to `handle`, as they come."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(nflog.fileno(), ready.set)
    try:
        while True:
            await ready.wait()
            ready.clear()
            for packet in nflog.receive():
                try:
                    await handle(packet)
                except Exception as error:  # one lost entry, never the log
                    log.warning("flowlog.publish_failed", error=str(error))
    finally:
        loop.remove_reader(nflog.fileno())
        nflog.close()
