"""The engine network sandboxes join, and its isolation; both set up at runner start, before any job runs.

The network is a plain bridge with a fixed name, subnet and Linux bridge name (settings `sandbox_network*`),
created through the Docker API when missing; the bridge name is what the host firewall (`firewall`) keys on,
so an existing network must carry the same bridge and subnet or the runner refuses to start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

import structlog

from tidepool_runner import firewall
from tidepool_runner.engine import ContainerEngine, EngineUnavailableError, SandboxFailedError
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.network")

BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
NETWORK_LABEL = "tidepool.network"
BRIDGE_LABEL = "tidepool.bridge"
ENGINE_WAIT_SECONDS = 60.0
ENGINE_RETRY_SECONDS = 1.0


class SandboxNetworkError(RuntimeError):
    """The sandbox network or its firewall cannot be set up; the message says what to fix."""


def network_config(settings: RunnerSettings) -> dict[str, Any]:
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
    if not firewall.BRIDGE_NAME.match(settings.sandbox_network_bridge):
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


def check_network(inspect: dict[str, Any], settings: RunnerSettings) -> None:
    """Raises SandboxNetworkError unless the existing network is the one `settings` describe."""
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


async def prepare_sandbox_network(engine: ContainerEngine, settings: RunnerSettings) -> None:
    """Ensure the sandbox network exists as configured, then apply the host firewall (idempotent).

    Waits up to ENGINE_WAIT_SECONDS for an unreachable engine. Raises SandboxNetworkError (misconfiguration,
    no permission, no iptables: the runner must not run sandboxes unprotected) or EngineUnavailableError.
    """
    config = network_config(settings)
    deadline = time.monotonic() + ENGINE_WAIT_SECONDS
    while True:
        try:
            inspect = await engine.ensure_network(config)
            break
        except EngineUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(ENGINE_RETRY_SECONDS)
        except SandboxFailedError as error:
            raise SandboxNetworkError(error.reason) from error
    check_network(inspect, settings)
    if not settings.sandbox_firewall:
        log.warning(
            "network.firewall_disabled",
            hint="sandboxes reach the host, each other and private addresses unless you isolate them",
        )
        return
    try:
        policy = firewall.policy_from_settings(settings, firewall.host_resolvers())
        await asyncio.to_thread(firewall.apply, policy)
    except firewall.FirewallError as error:
        raise SandboxNetworkError(f"sandbox firewall: {error}") from error
    log.info("network.ready", network=settings.sandbox_network, bridge=settings.sandbox_network_bridge)
