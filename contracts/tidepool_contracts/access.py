"""Who may do what on the bus: per service, the channels it publishes, consumes, asks and answers, and the KV
buckets it reads and writes.

This table is the only source of each service's NATS permissions (`tidepool_runtime.nats_auth` turns it into
nats-server users), and `tests/unit/test_nats_auth.py` checks it against the subscribers and publishers the
services really register, so the two cannot drift. A `Bus` refuses a bucket its service is not given here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tidepool_contracts import channels
from tidepool_contracts.channels import Bucket, Channel, Stream


@dataclass(frozen=True)
class Access:
    """One service's part of the bus.

    `publishes`/`consumes`: stream channels it sends on / reads (durable or replaying consumers; consuming
    a channel allows consumers on its whole stream, see README "Security"). `requests`/`answers`:
    request/reply channels. `reads`/`writes`: KV buckets (read = get, keys, watch; write = put, delete).
    `owns_topology`: may also update streams' configuration (the others only create a missing one).
    `tunes`: streams whose limits this service sets from its own settings (may update just those).
    """

    publishes: tuple[Channel[Any], ...] = ()
    consumes: tuple[Channel[Any], ...] = ()
    requests: tuple[Channel[Any], ...] = ()
    answers: tuple[Channel[Any], ...] = ()
    reads: tuple[Bucket[Any], ...] = ()
    writes: tuple[Bucket[Any], ...] = ()
    owns_topology: bool = False
    tunes: tuple[Stream, ...] = ()

    @property
    def streams(self) -> tuple[Stream, ...]:
        """The streams of its stream channels, in the channel table's order."""
        used = {channel.stream for channel in (*self.publishes, *self.consumes) if channel.stream}
        return tuple(stream for stream in channels.STREAMS if stream in used)

    @property
    def buckets(self) -> tuple[Bucket[Any], ...]:
        used = {*self.reads, *self.writes}
        return tuple(bucket for bucket in channels.BUCKETS if bucket in used)


API = Access(
    publishes=(channels.SANDBOX_INTENTS, channels.BUILD_JOBS, channels.WEBHOOK_EVENTS),
    consumes=(
        channels.WEBHOOK_EVENTS,
        channels.SANDBOX_EVENTS,
        channels.SNAPSHOT_EVENTS,
        channels.PROCESS_EVENTS,
        channels.DAEMON_EVENTS,
        channels.BUILD_LOG_LINES,
        channels.SANDBOX_FLOWS,
    ),
    answers=(channels.REGISTRY_CREDENTIALS,),
    requests=(channels.SANDBOX_METRICS_QUERY,),
    # DESIRED read: a resize of a stopped sandbox or an interval change updates the existing record.
    # RUNNERS, RUNNER_CONTROLS: the admin's runner routes (list, cordon, drain).
    reads=(
        channels.SIGNING_KEYS,
        channels.DESIRED,
        channels.PREVIEWS,
        channels.SIGNED_PREVIEWS,
        channels.SSH_ACCESS,
        channels.RUNNERS,
        channels.RUNNER_CONTROLS,
    ),
    writes=(
        channels.DESIRED,
        channels.RUNNER_CONTROLS,
        channels.API_KEYS,
        channels.SIGNING_KEYS,
        channels.PREVIEWS,
        channels.SIGNED_PREVIEWS,
        channels.SSH_ACCESS,
        channels.ORGANIZATION_TELEMETRY,
    ),
    owns_topology=True,
)
SCHEDULER = Access(
    publishes=(channels.RUNNER_JOBS, channels.SANDBOX_EVENTS),
    consumes=(channels.SANDBOX_INTENTS,),
    reads=(
        channels.RUNNERS,
        channels.RUNNER_CONTROLS,
        channels.PLACEMENTS,
        channels.DESIRED,
        channels.ROUTES,
        channels.ACTIVITY,
        channels.SCHEDULER_LEASE,
    ),
    writes=(channels.PLACEMENTS, channels.DESIRED, channels.SCHEDULER_LEASE),
)
BUILDER = Access(
    publishes=(channels.SNAPSHOT_EVENTS, channels.BUILD_LOG_LINES),
    consumes=(channels.BUILD_JOBS,),
    requests=(channels.REGISTRY_CREDENTIALS,),
)
RUNNER = Access(
    # SNAPSHOT_EVENTS: a snapshot committed from a sandbox (snapshot from a sandbox, fork).
    publishes=(
        channels.SANDBOX_EVENTS,
        channels.PROCESS_EVENTS,
        channels.DAEMON_EVENTS,
        channels.SNAPSHOT_EVENTS,
        channels.SANDBOX_METRICS,
        channels.SANDBOX_FLOWS,
    ),
    consumes=(channels.RUNNER_JOBS,),
    reads=(channels.ROUTES,),
    writes=(channels.ROUTES, channels.RUNNERS, channels.ACTIVITY),
)
PROXY = Access(
    reads=(
        channels.ROUTES,
        channels.API_KEYS,
        channels.SIGNING_KEYS,
        channels.PREVIEWS,
        channels.SIGNED_PREVIEWS,
    )
)
# Reads only: which sandbox a token opens, and where that sandbox runs.
SSH_GATEWAY = Access(reads=(channels.ROUTES, channels.SSH_ACCESS))
# DESIRED: each sandbox's cpu, memory and disk (the `used_*` organization metrics).
TELEMETRY = Access(
    consumes=(channels.SANDBOX_EVENTS, channels.SANDBOX_METRICS),
    reads=(channels.DESIRED, channels.ORGANIZATION_TELEMETRY),
    answers=(channels.SANDBOX_METRICS_QUERY,),
    tunes=(channels.SANDBOX_METRICS_SAMPLES,),
)

SERVICE_ACCESS: dict[str, Access] = {
    "api": API,
    "scheduler": SCHEDULER,
    "builder": BUILDER,
    "runner": RUNNER,
    "proxy": PROXY,
    "ssh_gateway": SSH_GATEWAY,
    "telemetry": TELEMETRY,
}
