"""The engine network sandboxes join, and its isolation; both set up at runner start, before any job runs.

The network is a plain bridge with a fixed name, subnet and Linux bridge name (settings `sandbox_network*`),
created through the Docker API when missing (its definition: tidepool_runtime.isolation); the bridge name is
what the host firewall (`firewall`) keys on, so an existing network must carry the same bridge and subnet or
the runner refuses to start. Snapshot builds join the same network (the builder waits for it).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from tidepool_runner import firewall
from tidepool_runner.engine import ContainerEngine, EngineUnavailableError, SandboxFailedError
from tidepool_runtime.isolation import SandboxNetworkError, check_network, network_config
from tidepool_runtime.settings import RunnerSettings

log = structlog.get_logger("tidepool.runner.network")

# The network's definition is shared with the builder, whose RUN steps join it too.
__all__ = ["SandboxNetworkError", "check_network", "network_config", "prepare_sandbox_network"]

ENGINE_WAIT_SECONDS = 60.0
ENGINE_RETRY_SECONDS = 1.0


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
