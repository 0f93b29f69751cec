"""What confines tenant code on a compute host, shared by every service that runs it (issue #7).

Tenant code runs in two places: sandboxes (the runner) and the `RUN` steps of snapshot builds (the builder).
Both get the same confinement from the definitions here, so the two can't drift apart:

- `SANDBOX_CAPABILITIES`: the only capabilities left after dropping all (no MKNOD, NET_RAW, ...);
- the sandbox network (`network_config`, `check_network`): a bridge with a fixed name and subnet, which the
  runner creates and puts behind its host firewall (the firewall keys on the bridge name);
- `auto_userns_size`: the size of the private user namespace range each sandbox or build gets.

Pure: no I/O; the services apply these through the engine API.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from tidepool_runtime.settings import SandboxNetworkSettings

# Docker's default set minus MKNOD, NET_RAW, NET_BIND_SERVICE and SETPCAP: enough for package managers
# (ownership, setuid helpers such as apt's _apt user and sudo, file capabilities set by dpkg).
SANDBOX_CAPABILITIES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "AUDIT_WRITE",
    "SYS_CHROOT",
)

BRIDGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
NETWORK_LABEL = "tidepool.network"
BRIDGE_LABEL = "tidepool.bridge"

DEFAULT_USERNS_SIZE = 65536
_USERNS_SIZE = re.compile(r"(?:^|,)size=(\d+)(?:,|$)")


class SandboxNetworkError(RuntimeError):
    """The sandbox network cannot be used (misconfigured or missing); the message says what to fix."""


def network_config(settings: SandboxNetworkSettings) -> dict[str, Any]:
    """`POST /networks/create` body (Docker and Podman's compat API both honour the bridge name option).

    Raises SandboxNetworkError when the name, subnet or bridge setting is unusable.
    """
    if not settings.sandbox_network:
        raise SandboxNetworkError("TIDEPOOL_SANDBOX_NETWORK must name the sandbox network")
    try:
        subnet = ipaddress.ip_network(settings.sandbox_network_subnet)
    except ValueError:
        raise SandboxNetworkError(
            f"TIDEPOOL_SANDBOX_NETWORK_SUBNET {settings.sandbox_network_subnet!r} is not a network address"
        ) from None
    if subnet.version != 4:
        raise SandboxNetworkError("TIDEPOOL_SANDBOX_NETWORK_SUBNET must be an IPv4 subnet")
    if not BRIDGE_NAME.match(settings.sandbox_network_bridge):
        raise SandboxNetworkError(
            f"TIDEPOOL_SANDBOX_NETWORK_BRIDGE {settings.sandbox_network_bridge!r} is not a valid "
            "interface name (1-15 of letters, digits, _ . -)"
        )
    return {
        "Name": settings.sandbox_network,
        "Driver": "bridge",
        "Internal": False,
        "EnableIPv6": False,
        "Options": {BRIDGE_NAME_OPTION: settings.sandbox_network_bridge},
        "IPAM": {"Config": [{"Subnet": str(subnet)}]},
        # Inspect does not return the bridge name on Podman: the label records it, to be checked on restart.
        "Labels": {NETWORK_LABEL: "sandboxes", BRIDGE_LABEL: settings.sandbox_network_bridge},
    }


def check_network(inspect: dict[str, Any], settings: SandboxNetworkSettings) -> None:
    """Raises SandboxNetworkError unless the existing network (`GET /networks/{name}` body) is the one
    `settings` describe: on another bridge the firewall would not protect it."""
    name, bridge = settings.sandbox_network, settings.sandbox_network_bridge
    labels = inspect.get("Labels") or {}
    options = inspect.get("Options") or {}
    actual_bridge = options.get(BRIDGE_NAME_OPTION) or labels.get(BRIDGE_LABEL)
    subnets = {
        str(ipaddress.ip_network(config["Subnet"], strict=False))
        for config in (inspect.get("IPAM") or {}).get("Config") or []
        if config.get("Subnet")
    }
    wanted_subnet = str(ipaddress.ip_network(settings.sandbox_network_subnet))
    if actual_bridge != bridge or wanted_subnet not in subnets:
        raise SandboxNetworkError(
            f"network {name!r} exists with bridge {actual_bridge!r} and subnets {sorted(subnets)}, but the "
            f"settings say bridge {bridge!r} and subnet {wanted_subnet}: the firewall could not protect it. "
            f"Remove it (`podman network rm {name}`, no sandbox may use it) or change "
            "TIDEPOOL_SANDBOX_NETWORK/_SUBNET/_BRIDGE"
        )


def auto_userns_size(userns: str) -> int:
    """The range size of a Podman `--userns=auto[:size=N,...]` value (DEFAULT_USERNS_SIZE without one).

    Raises ValueError for any other mode: tenant code always gets a private range (never `host`).
    """
    mode, _, options = userns.partition(":")
    if mode != "auto":
        raise ValueError(f"user namespace mode {userns!r}: tenant code needs `auto` (a private uid range)")
    match = _USERNS_SIZE.search(options)
    return int(match.group(1)) if match else DEFAULT_USERNS_SIZE
