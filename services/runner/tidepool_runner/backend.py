"""The one interface between a runner's job handlers and whatever runs its sandboxes.

`SandboxBackend` is what `jobs.JobExecutor` drives: it turns a `RunnerJob` into one call here and reports
the outcome (routes, state events, snapshot events) itself, so the handlers need nothing else. Today's
backend is `container_backend.ContainerEngineBackend` (containers on the runner's own Podman through the
Docker API); a Pod backend (sandboxes as Pods under a gVisor/Kata RuntimeClass) implements the same
methods and advertises what it can do in `capabilities`, which the runner sends with every heartbeat and
the scheduler matches against each sandbox's needs (tidepool_contracts.models.required_capabilities). The
scheduler never learns which backend a runner has.

Contract every method keeps:

- **Idempotent and convergent.** A job is redelivered after a crash or sent twice; each call finds the
  sandbox where an earlier attempt left it and finishes the work (a second `delete` of a deleted sandbox,
  a `start` of a running one, an `archive` whose first attempt already removed the sandbox: all succeed).
- **Two errors.** `SandboxFailedError(reason)`: the sandbox cannot reach the requested state; `reason` is
  shown to the user as the sandbox's `errorReason` (or the snapshot's). `BackendUnavailableError`: the
  backend could not do it now (its engine or API unreachable, overloaded); the job is redelivered with
  backoff and reported as an error after a few attempts. Anything else is a bug.
- **Units.** cpu in whole cores, memory and disk in GiB, as in `SandboxSpec`; image references as the
  engine or registry spells them (`registry/repository:tag`).
- **One job per sandbox at a time.** The executor holds the sandbox's lock around each call; calls for
  different sandboxes run concurrently.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import aiohttp

from tidepool_contracts.models import RunnerCapabilities, SandboxMetricsSample, SandboxSpec
from tidepool_contracts.states import SandboxState

# The host part of every URL sent through a ToolboxChannel session: the channel decides where it goes.
TOOLBOX_BASE_URL = "http://daemon"


class BackendUnavailableError(Exception):
    """The backend could not do it now (unreachable, overloaded): the job should be retried."""


class SandboxFailedError(Exception):
    """The sandbox cannot reach the requested state; `reason` is shown to the user as `errorReason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ToolboxUnreachableError(OSError):
    """The sandbox's toolbox daemon cannot be reached (not running, or its channel fails verification)."""


@dataclass(frozen=True)
class HostedSandbox:
    """A sandbox this runner's backend hosts, as the heartbeat and the adoption after a restart see it."""

    sandbox_id: str
    organization_id: str
    # What its route reports: started (running or paused), stopped, or error (a state the backend cannot
    # map).
    state: SandboxState
    # It holds its cpu and memory now (running, not paused): what the heartbeat counts as allocated.
    running: bool
    cpu: int  # cores
    memory_gib: int


@dataclass(frozen=True)
class SnapshotImage:
    """A sandbox filesystem committed to an image (`SandboxBackend.snapshot`)."""

    # Where any runner can start a sandbox from it: the platform registry's copy when there is a registry,
    # else the local name asked for.
    reference: str
    size_bytes: int | None = None


@runtime_checkable
class ToolboxChannel(Protocol):
    """The exec relay: HTTP (and WebSocket) sessions that reach a sandbox's toolbox daemon, which serves
    the toolbox API (exec, sessions, files, PTY, …; tidepool_contracts.toolbox_routes). The runner's
    toolbox server relays the proxy's requests through it; URLs are `TOOLBOX_BASE_URL/<toolbox path>`."""

    def session(self, sandbox_id: str) -> aiohttp.ClientSession:
        """A pooled session whose every connection reaches this sandbox's daemon, verified as its own (a
        connection that cannot be verified fails with an OSError before a byte is sent)."""
        ...

    def port_session(self, sandbox_id: str, port: int) -> aiohttp.ClientSession:
        """A session reaching `port` inside the sandbox (previews), through its daemon."""
        ...

    async def probe_version(self, sandbox_id: str) -> str | None:
        """The daemon's version if it answers now, else None (never raises)."""
        ...

    async def open_tunnel(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw byte stream to `port` on the sandbox's loopback, through its daemon (SSH port forwarding).
        Raises ToolboxUnreachableError if the daemon cannot be reached, another OSError if nothing
        answers on the port."""
        ...

    async def close(self, sandbox_id: str) -> None:
        """Drop the sandbox's pooled connections (it stops, restarts or goes)."""
        ...

    async def close_all(self) -> None: ...


@runtime_checkable
class SandboxBackend(Protocol):
    """Runs sandboxes for one runner. See the module doc for the contract every method keeps."""

    @property
    def capabilities(self) -> RunnerCapabilities:
        """What this backend can do (isolation kind, live resize, archive, snapshots, network policies,
        volumes, gpu); constant for the backend's life. Sent in the runner's heartbeat."""
        ...

    @property
    def toolbox(self) -> ToolboxChannel:
        """The exec relay to the sandboxes' toolbox daemons."""
        ...

    async def list_sandboxes(self) -> list[HostedSandbox]:
        """Every sandbox this backend hosts for this runner now, running or not (the heartbeat's
        allocation). BackendUnavailableError or SandboxFailedError when it cannot tell (the runner then
        reports itself unschedulable)."""
        ...

    async def stats(self) -> list[SandboxMetricsSample]:
        """One resource sample per running sandbox, now: cpu utilization (% of its limit, since the previous
        call; None in a sandbox's first sample), memory, filesystem and network in bytes. A sandbox that
        cannot be read this time is left out; errors as `list_sandboxes`. The runner publishes them on
        `channels.SANDBOX_METRICS` every `sandbox_metrics_interval_seconds`."""
        ...

    async def adopt(self) -> list[HostedSandbox]:
        """After a runner restart: remove what the runner keeps locally of sandboxes that no longer exist
        (e.g. the disk of a delete interrupted half-way), then return the hosted sandboxes, whose routes
        the runner publishes again. Errors as `list_sandboxes`; retried until it succeeds."""
        ...

    async def start(self, spec: SandboxSpec) -> str:
        """Bring the sandbox `spec` describes to running with its toolbox daemon answering; returns the
        daemon's version. Creates it first if it does not exist (CREATE and START converge alike; a Pod
        cannot exist stopped anyway), from `spec.image`, which after an archive is the archive's image:
        that is the restore. Applies the spec's cpu and memory, egress policy, volumes and (for a claimed
        warm-pool sandbox, `spec.claimed`) its tenant's env. A paused sandbox is resumed."""
        ...

    async def claim(self, spec: SandboxSpec) -> str:
        """A running warm-pool sandbox now belongs to `spec.organization_id`: give its daemon the
        claimer's env without a restart; one that does not run any more is started as `start` would.
        Returns the daemon's version."""
        ...

    async def stop(self, spec: SandboxSpec, *, force: bool = False) -> None:
        """Stop the sandbox (`force`: kill at once, else a graceful stop bounded by a timeout), keeping its
        disk and files for a later `start`; its egress rules and volume mounts go. Already stopped: fine.
        Raises SandboxFailedError("container missing") if the sandbox does not exist here."""
        ...

    async def recover(self, spec: SandboxSpec) -> str:
        """Restart a sandbox from a recoverable error: killed if it still runs (it may be wedged), then
        started as `start` does, disk and files kept. Returns the daemon's version."""
        ...

    async def delete(self, sandbox_id: str) -> None:
        """Remove the sandbox and everything the runner keeps of it (disk, mounts, rules, toolbox
        channel). Missing: fine. The executor removes the route afterwards."""
        ...

    async def resize(self, spec: SandboxSpec) -> bool:
        """Apply `spec.cpu` and `spec.memory_gib` to the running sandbox without a restart; True if it ran
        and was resized, False if it does not run (nothing changed: the executor then `start`s it, which
        applies the new resources). SandboxFailedError when the new size is refused (e.g. memory below what
        the sandbox uses) or the backend cannot resize live (`capabilities.live_resize` False)."""
        ...

    async def update_network(self, spec: SandboxSpec) -> None:
        """Apply the spec's egress policy (block all, CIDR and domain allow lists) to the running sandbox
        now, without a restart; a sandbox that does not run gets it at its next `start`."""
        ...

    async def archive(self, spec: SandboxSpec, archive_id: str) -> str:
        """Stop the sandbox if it runs, commit its filesystem (files, installed packages) to an image named
        after `archive_id` (deterministic, so a redelivered job finds it), push it to the platform registry
        when there is one, and remove the sandbox and its disk: the runner keeps nothing. Returns the image
        reference a later `start` (on any runner) restores it from. A sandbox already gone (an earlier
        attempt finished) returns the same reference."""
        ...

    async def snapshot(self, spec: SandboxSpec, image_ref: str) -> SnapshotImage:
        """Commit the sandbox's filesystem to `image_ref` (a running sandbox is frozen meanwhile and keeps
        running); pushed to the platform registry when there is one. The sandbox's state does not change.
        SandboxFailedError if it does not exist here or the commit or push fails."""
        ...

    async def close(self) -> None:
        """Release the backend's connections (the runner stops); sandboxes keep running."""
        ...
