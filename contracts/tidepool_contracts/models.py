"""Typed messages on the bus. Every message a service publishes or reads is one of these models."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tidepool_contracts.states import DesiredState, SandboxState


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class BusModel(BaseModel):
    # Unknown fields are ignored so a newer publisher never breaks an older consumer.
    model_config = ConfigDict(extra="ignore", frozen=True)


class VolumeMountSpec(BusModel):
    """One volume in a sandbox: the runner FUSE-mounts `{bucket}/{key_prefix}/{subpath}` of the
    organization's object storage and binds it at `mount_path` (validated by the API)."""

    volume_id: str
    mount_path: str
    # Relative, normalised ("" = the whole volume): becomes the mount's root.
    subpath: str = ""
    # Where the volume's objects live in the organization's bucket, e.g. `volumes/<id>`.
    key_prefix: str


class SandboxSpec(BusModel):
    """Everything a runner needs to create the sandbox's container."""

    sandbox_id: str
    organization_id: str
    image: str
    # The snapshot's name (None: built from an image or a Dockerfile): a label of its exported telemetry.
    snapshot: str | None = None
    os_user: str = "daytona"
    cpu: int = 1
    memory_gib: int = 1
    disk_gib: int = 3
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network_block_all: bool = False
    # Egress only to these IPv4 CIDRs (plus DNS to the sandbox resolvers); empty: the runner's default
    # policy. Ignored when `network_block_all` (which wins, as in Daytona).
    network_allow_list: list[str] = Field(default_factory=list)
    # Egress only to the addresses these domains resolve to (re-resolved by the runner), with the CIDRs.
    domain_allow_list: list[str] = Field(default_factory=list)
    entrypoint: list[str] | None = None
    volumes: list[VolumeMountSpec] = Field(default_factory=list)
    # Claimed from the warm pool: the container was created for no tenant, so its creation env lacks the
    # claimer's `env` and organization; the runner pushes them to the daemon (`POST /env`) after each start.
    claimed: bool = False


class SandboxAction(StrEnum):
    CREATE = "create"
    START = "start"
    STOP = "stop"
    DESTROY = "destroy"
    # A running sandbox's cpu/memory grew (spec carries the new values); a stopped one's new resources are
    # applied by its next START.
    RESIZE = "resize"
    # From a recoverable error: the container is restarted (killed if it still runs), as a stop and a start.
    RECOVER = "recover"
    # A stopped sandbox's filesystem is committed to an image (pushed to the platform registry when there is
    # one), its container and disk removed: `archived`, restored by a later START on any runner.
    ARCHIVE = "archive"
    # The sandbox's filesystem is committed to the image `SandboxIntent.snapshot` names (a snapshot, or the
    # image of a fork); the sandbox's own state does not change. Not a desired state: sent once.
    SNAPSHOT = "snapshot"
    # A running sandbox's egress policy changed (spec carries the new one); applied at once, no restart.
    # Not a desired state: sent once (a stopped sandbox's next START applies the spec's policy anyway).
    NETWORK = "network"
    # A started warm-pool sandbox was claimed by an organization: the runner applies the spec's env and
    # organization to its daemon (no restart), rewrites its route, and reports `started` again.
    CLAIM = "claim"


class SnapshotTarget(BusModel):
    """Where a SNAPSHOT job commits the sandbox's filesystem: the snapshot row and its local image name."""

    snapshot_id: str
    snapshot_name: str
    image_ref: str


class SandboxIntent(BusModel):
    """API -> scheduler: the user asked for this sandbox to reach a new desired state."""

    intent_id: str = Field(default_factory=new_id)
    sandbox_id: str
    organization_id: str
    action: SandboxAction
    spec: SandboxSpec
    force: bool = False
    snapshot: SnapshotTarget | None = None
    issued_at: datetime = Field(default_factory=utc_now)


class RunnerJob(BusModel):
    """Scheduler -> one runner: do this to the sandbox's container. Executed idempotently."""

    job_id: str = Field(default_factory=new_id)
    intent_id: str
    sandbox_id: str
    action: SandboxAction
    spec: SandboxSpec
    force: bool = False
    snapshot: SnapshotTarget | None = None
    issued_at: datetime = Field(default_factory=utc_now)


class SandboxStateEvent(BusModel):
    """Runner/scheduler -> everyone: the sandbox's actual state changed."""

    sandbox_id: str
    organization_id: str
    state: SandboxState
    error_reason: str | None = None
    # With `error`: the sandbox can get back to `started` (e.g. by a stop and a start), as Daytona's flag.
    recoverable: bool = False
    runner_id: str | None = None
    daemon_version: str | None = None
    source: str
    # Why the platform changed the state on its own (a lifecycle timer), None when a user asked for it:
    # `auto_stop` (idle for its autoStopInterval), `auto_delete` (stopped for its autoDeleteInterval),
    # `auto_archive` (stopped for its autoArchiveInterval).
    cause: str | None = None
    # With `archived`: the image holding the sandbox's filesystem, what its next start restores it from.
    image: str | None = None
    occurred_at: datetime = Field(default_factory=utc_now)


class ProcessTerminationEvent(BusModel):
    """Runner -> API: a process in a sandbox ended abnormally (signal, timeout, OOM kill)."""

    sandbox_id: str
    organization_id: str
    # One daemon run (a sandbox start); with `sequence` it identifies the record across redeliveries.
    daemon_boot_id: str
    sequence: int
    kind: str  # exec | code_run | session | pty
    command: str
    exit_code: int | None = None
    reason: str
    signal: int | None = None
    ended_at: datetime


class DaemonHealthOutcome(StrEnum):
    RESTARTED = "restarted"  # the toolbox stopped answering; its worker was replaced and it answers again
    RESTART_FAILED = "restart_failed"  # it stopped answering and still does not after the restart
    RECOVERED = "recovered"  # it answers again after a failed restart


class DaemonHealthEvent(BusModel):
    """Runner -> API: what the runner's health check did about a sandbox's toolbox daemon."""

    sandbox_id: str
    organization_id: str
    outcome: DaemonHealthOutcome
    # Why, in words: what did not answer, for how long, and what was done.
    reason: str
    # Identifies one incident across redeliveries.
    incident_id: str = Field(default_factory=new_id)
    occurred_at: datetime = Field(default_factory=utc_now)


class DesiredSandbox(BusModel):
    """API -> KV: the desired state the scheduler reconciles towards."""

    sandbox_id: str
    organization_id: str
    desired_state: DesiredState
    spec: SandboxSpec
    force: bool = False
    intent_id: str
    updated_at: datetime = Field(default_factory=utc_now)
    # Lifecycle timers, in minutes (behaviour spec "sandboxes"): stop after this long without activity
    # (0: never); delete after this long stopped (-1: never, 0: as soon as it stops, i.e. ephemeral).
    auto_stop_interval: int = 0
    auto_delete_interval: int = -1
    # Archive after this long stopped (0: never; the API stores Daytona's "0 = the maximum" as the maximum).
    auto_archive_interval: int = 0


class SandboxActivity(BusModel):
    """Runner -> KV, throttled: when the sandbox's toolbox was last used (what keeps it from stopping)."""

    sandbox_id: str
    last_activity_at: datetime = Field(default_factory=utc_now)


class Placement(BusModel):
    """Scheduler -> KV: which runner hosts a sandbox, and the last job it was sent."""

    sandbox_id: str
    runner_id: str
    last_intent_id: str
    last_action: SandboxAction
    sent_at: datetime = Field(default_factory=utc_now)
    attempts: int = 1


class SchedulerLease(BusModel):
    """Scheduler replica -> KV: the leader's lease, renewed by compare-and-set on its revision
    (tidepool_scheduler.leader); `holder` is the replica's id."""

    holder: str
    renewed_at: datetime = Field(default_factory=utc_now)


class SandboxRoute(BusModel):
    """Runner -> KV: where the proxy sends toolbox traffic for a sandbox."""

    sandbox_id: str
    organization_id: str
    runner_id: str
    runner_url: str
    state: SandboxState
    updated_at: datetime = Field(default_factory=utc_now)


class IsolationKind(StrEnum):
    """How a runner's sandbox backend isolates sandboxes."""

    # Containers on the runner's own container engine (Podman's Docker API): user namespace, seccomp,
    # the host firewall on the sandbox bridge. Today's only backend.
    CONTAINER = "container"
    # Pods in a Kubernetes cluster under a sandboxing RuntimeClass (gVisor, Kata); not implemented yet.
    POD = "pod"


class Capability(StrEnum):
    """What a sandbox (or a job on it) may need of its runner (see `RunnerCapabilities.unmet`)."""

    LIVE_RESIZE = "live_resize"
    ARCHIVE = "archive"
    SNAPSHOTS = "snapshots"
    NETWORK_POLICIES = "network_policies"
    DOMAIN_ALLOW_LISTS = "domain_allow_lists"
    VOLUMES = "volumes"
    GPU = "gpu"


class RunnerCapabilities(BusModel):
    """What a runner's sandbox backend can do (tidepool_runner.backend.SandboxBackend.capabilities), sent
    with every heartbeat. The scheduler places a sandbox only on a runner whose capabilities cover what
    the sandbox and the job need.

    The defaults describe today's container-engine backend, so a heartbeat from a runner that predates
    this field reads as exactly what that runner can do."""

    isolation: IsolationKind = IsolationKind.CONTAINER
    # The Kubernetes RuntimeClass sandboxes run under (`gvisor`, `kata`); None for the container engine.
    runtime_class: str | None = None
    # A running sandbox's cpu and memory change without a restart (a RESIZE job).
    live_resize: bool = True
    # A stopped sandbox's filesystem can be committed to an image and its local state dropped (ARCHIVE).
    archive: bool = True
    # A sandbox's filesystem can be committed to a snapshot image (SNAPSHOT, forks).
    snapshots: bool = True
    # Egress policies: block all, CIDR allow lists (and their live change, NETWORK).
    network_policies: bool = True
    # Egress allowed to what domain names resolve to (re-resolved while the sandbox runs).
    domain_allow_lists: bool = True
    # Object-storage volumes mounted into sandboxes.
    volumes: bool = True
    gpu: bool = False

    def unmet(self, needs: frozenset[Capability]) -> list[Capability]:
        """The capabilities among `needs` this runner lacks, in a stable order (empty: it can take it)."""
        return sorted(need for need in needs if not getattr(self, need.value))


def required_capabilities(spec: SandboxSpec, action: SandboxAction | None = None) -> frozenset[Capability]:
    """What a runner must be able to do to host the sandbox `spec` describes (and, given `action`, to carry
    out that job on it): a network policy needs network policies, a volume needs volumes, a RESIZE of a
    running sandbox needs live resize, and so on."""
    needs: set[Capability] = set()
    if spec.network_block_all or spec.network_allow_list:
        needs.add(Capability.NETWORK_POLICIES)
    if spec.domain_allow_list and not spec.network_block_all:
        needs.update((Capability.NETWORK_POLICIES, Capability.DOMAIN_ALLOW_LISTS))
    if spec.volumes:
        needs.add(Capability.VOLUMES)
    match action:
        case SandboxAction.RESIZE:
            needs.add(Capability.LIVE_RESIZE)
        case SandboxAction.ARCHIVE:
            needs.add(Capability.ARCHIVE)
        case SandboxAction.SNAPSHOT:
            needs.add(Capability.SNAPSHOTS)
        case SandboxAction.NETWORK:
            needs.add(Capability.NETWORK_POLICIES)
        case _:
            pass
    return frozenset(needs)


class RunnerInfo(BusModel):
    """Runner -> KV heartbeat: identity, address, capacity and what its sandbox backend can do."""

    runner_id: str
    url: str
    region: str = "us"
    cpu_total: int
    memory_total_gib: int
    cpu_allocated: int = 0
    memory_allocated_gib: int = 0
    sandboxes_running: int = 0
    sandboxes_total: int = 0
    unschedulable: bool = False
    # Absent in heartbeats of runners older than the field: those are container-engine runners.
    capabilities: RunnerCapabilities = Field(default_factory=RunnerCapabilities)
    heartbeat_at: datetime = Field(default_factory=utc_now)


class RunnerControl(BusModel):
    """API -> scheduler: what the admin decided about a runner (`POST /runners/{id}/cordon|drain|uncordon`).

    `cordoned`: no new sandbox is placed on it (its sandboxes keep running; those it hosts stay there).
    `draining`: cordoned, and reported as draining until it hosts no sandbox (the admin stops, archives
    or deletes them; nothing is moved automatically yet). No record: schedulable."""

    runner_id: str
    cordoned: bool = False
    draining: bool = False
    updated_at: datetime = Field(default_factory=utc_now)


class ApiKeyRecord(BusModel):
    """API -> KV: what the proxy needs to authenticate a key (stored under the key's hash)."""

    key_id: str
    organization_id: str
    expires_at: datetime | None = None
    revoked: bool = False
    # The key's scopes (`tidepool_contracts.permissions`): the proxy refuses toolbox calls without
    # write:sandboxes. Empty (a record without the field) means no scope: fail closed.
    permissions: tuple[str, ...] = ()


class SigningKeyRecord(BusModel):
    """API -> KV: the per-sandbox HMAC key of signed file URLs; rotating it invalidates every old URL."""

    sandbox_id: str
    organization_id: str
    key: str
    rotated_at: datetime = Field(default_factory=utc_now)


class PreviewAccess(BusModel):
    """API -> KV: who may open a sandbox's preview URLs (`{port}-{sandboxId}.{domain}`).

    `token_hash`: SHA-256 (hex) of the sandbox's current preview token, which the API replaces on every
    start; the token itself never travels on the bus."""

    sandbox_id: str
    organization_id: str
    public: bool = False
    token_hash: str = ""
    updated_at: datetime = Field(default_factory=utc_now)


class SignedPreview(BusModel):
    """API -> KV (under SHA-256 of its token): a signed preview URL `{port}-{token}.{domain}`; deleting it
    expires the URL at once."""

    sandbox_id: str
    organization_id: str
    port: int
    expires_at: datetime


class SshAccessGrant(BusModel):
    """API -> KV (under SHA-256 of its token): an SSH access token; `ssh <token>@gateway` opens this sandbox
    until `expires_at`. Deleting it revokes the token at once."""

    sandbox_id: str
    organization_id: str
    expires_at: datetime


class OrganizationTelemetry(BusModel):
    """API -> KV: where an organization's metrics go, and its quotas (feature inventory §10 B).

    `endpoint`: the organization's OTLP destination (`PUT /organizations/{id}/otel-config`), "" for none:
    `http(s)://host[:port][/path]` is OTLP/HTTP (`/v1/metrics` appended), `grpc(s)://host:port` is OTLP/gRPC.
    `headers_sealed`: the request headers as a JSON object, sealed by the API for the telemetry service
    (`tidepool_runtime.sealing.OTEL_HEADERS`); "" for none. Quotas in cores and GiB (the `total_*` metrics),
    as the API enforces them; None: no limit (the admin organization's default), no `total_*` point reported.
    """

    organization_id: str
    endpoint: str = ""
    headers_sealed: str = ""
    total_cpu: float | None
    total_memory_gib: float | None
    total_disk_gib: float | None
    updated_at: datetime = Field(default_factory=utc_now)


class SnapshotState(StrEnum):
    PENDING = "pending"
    PULLING = "pulling"
    BUILDING = "building"
    ACTIVE = "active"
    INACTIVE = "inactive"
    ERROR = "error"
    BUILD_FAILED = "build_failed"
    REMOVING = "removing"


class BuildJob(BusModel):
    """API -> builder: build this snapshot image (Dockerfile plus context files)."""

    job_id: str = Field(default_factory=new_id)
    # The snapshot row this job is for; None for the platform's own image (its general snapshots).
    snapshot_id: str | None = None
    snapshot_name: str
    image_ref: str
    dockerfile: str
    # Local directory whose files join the context (the platform's own images).
    context_dir: str | None = None
    # Whose build it is (None: the platform's own image). Declarative builds: context archives
    # `{organization_id}/{hash}/context.tar` in object storage, each checked against its hash.
    organization_id: str | None = None
    context_hashes: list[str] = Field(default_factory=list)
    # Pull-only snapshots: make `source_image` available locally under `image_ref` instead of building.
    source_image: str | None = None
    # Evict `image_ref` (and its registry copy) instead of producing it: an expired build-cache entry.
    remove: bool = False
    registry_ref: str | None = None
    issued_at: datetime = Field(default_factory=utc_now)


class SnapshotEvent(BusModel):
    """Builder -> everyone: a snapshot image changed state (the snapshot `snapshot_id`, when given)."""

    snapshot_id: str | None = None
    snapshot_name: str
    image_ref: str
    state: SnapshotState
    error_reason: str | None = None
    # Filled when the image is ready: what the runner must run and how big it is.
    entrypoint: list[str] | None = None
    size_bytes: int | None = None
    # Where runners pull the image from when they do not have it.
    registry_ref: str | None = None
    occurred_at: datetime = Field(default_factory=utc_now)


class BuildLogLine(BusModel):
    """Builder -> API: one chunk of build output; `done` marks the end of one build attempt."""

    image_ref: str
    text: str = ""
    done: bool = False


class RegistryCredentialsRequest(BusModel):
    """Which credentials an image pull needs: the organization's registry matching the image's host."""

    organization_id: str
    image: str


class RegistryCredentialsReply(BusModel):
    found: bool
    username: str = ""
    password: str = ""
    server_address: str = ""


class SandboxMetricsSample(BusModel):
    """One runner sample of a running sandbox's resources (runner -> telemetry, every few seconds).

    Units: `cpu_utilization` % of the sandbox's CPU limit (0-100), `cpu_limit` cores, memory and filesystem
    in bytes, network in bytes since the container started (counters). A value the host could not read is
    None (e.g. a cgroup controller that is not mounted)."""

    sandbox_id: str
    organization_id: str
    runner_id: str
    sampled_at: datetime
    cpu_utilization: float | None = None
    cpu_limit: float | None = None
    memory_usage: int | None = None
    memory_limit: int | None = None
    memory_cache: int | None = None
    filesystem_usage: int | None = None
    filesystem_total: int | None = None
    network_rx_bytes: int | None = None
    network_tx_bytes: int | None = None


class SandboxFlow(BusModel):
    """One new connection (or UDP flow) a sandbox with a network policy opened, as its runner's firewall
    saw it (runner -> API, the sandbox's flow log). `verdict`: `allowed` or `denied`; `rule`: what decided,
    e.g. `networkBlockAll`, `networkAllowList 10.0.0.0/8`, `domainAllowList pypi.org`, `dns`, or
    `not in the allow lists`. `port` is None for protocols without ports (ICMP)."""

    sandbox_id: str
    runner_id: str
    time: datetime
    protocol: str
    source: str
    destination: str
    port: int | None = None
    verdict: Literal["allowed", "denied"]
    rule: str


class SandboxMetricsQuery(BusModel):
    """API -> telemetry: the samples of one sandbox between `start` and `end` (inclusive), only the metrics
    named (Daytona's names, e.g. `daytona.sandbox.cpu.utilization`; empty: all)."""

    sandbox_id: str
    start: datetime
    end: datetime
    metric_names: list[str] = Field(default_factory=list)


class MetricPoint(BusModel):
    timestamp: datetime
    value: float


class MetricSeriesData(BusModel):
    metric_name: str
    points: list[MetricPoint]


class SandboxMetricsReply(BusModel):
    """One series per metric name that has points in the range (Daytona's `MetricsResponse` in bus form)."""

    series: list[MetricSeriesData] = Field(default_factory=list)


class WebhookEventType(StrEnum):
    """Daytona's webhook event types (behaviour spec §17)."""

    SANDBOX_CREATED = "sandbox.created"
    SANDBOX_STATE_UPDATED = "sandbox.state.updated"
    SNAPSHOT_CREATED = "snapshot.created"
    SNAPSHOT_STATE_UPDATED = "snapshot.state.updated"
    SNAPSHOT_REMOVED = "snapshot.removed"
    VOLUME_CREATED = "volume.created"
    VOLUME_STATE_UPDATED = "volume.state.updated"


class WebhookEvent(BusModel):
    """API -> API (its webhook fan-out): one committed change an organization's endpoints may subscribe to.

    `id` is the Standard Webhooks `webhook-id` every endpoint receives (receivers deduplicate by it);
    `ordering_key` (e.g. `sandbox:<id>`) names the resource whose events are delivered in `sequence` order;
    `payload` is Daytona's flat JSON body (`event`, `timestamp` and the event's fields)."""

    id: str
    organization_id: str
    event_type: WebhookEventType
    ordering_key: str
    sequence: int
    payload: dict[str, Any]
    occurred_at: datetime = Field(default_factory=utc_now)
