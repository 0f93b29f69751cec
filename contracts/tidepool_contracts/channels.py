"""The channel table: every stream, subject and KV bucket on the bus, each paired with its one model.

Publishers and subscribers are built from these entries (`tidepool_runtime.broker`), never from bare subject
strings, so a service cannot put the wrong model on a subject and the AsyncAPI document
(`docs/asyncapi/asyncapi.yaml`, generated from the subscribers and publishers) lists exactly these.

A channel's `subject` is a template: `{name}` stands for one subject token (an id, or a `kv_safe` name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

from tidepool_contracts import subjects
from tidepool_contracts.models import (
    ApiKeyRecord,
    BuildJob,
    BuildLogLine,
    DaemonHealthEvent,
    DesiredSandbox,
    OrganizationTelemetry,
    Placement,
    PreviewAccess,
    ProcessTerminationEvent,
    RegistryCredentialsReply,
    RegistryCredentialsRequest,
    RunnerControl,
    RunnerInfo,
    RunnerJob,
    SandboxActivity,
    SandboxFlow,
    SandboxIntent,
    SandboxMetricsQuery,
    SandboxMetricsReply,
    SandboxMetricsSample,
    SandboxRoute,
    SandboxStateEvent,
    SchedulerLease,
    SignedPreview,
    SigningKeyRecord,
    SnapshotEvent,
    SshAccessGrant,
    WebhookEvent,
)

ModelT = TypeVar("ModelT", bound=BaseModel)
_TOKEN = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Stream:
    """A JetStream stream. `retention`: work queue (each message to one consumer, removed on ack) or limits
    (kept until `max_age` seconds / `max_msgs_per_subject`, replayable). `duplicate_window` (seconds) makes a
    publish with a repeated `Nats-Msg-Id` a no-op."""

    name: str
    retention: Literal["workqueue", "limits"]
    description: str
    max_age: float | None = None
    max_msgs_per_subject: int | None = None
    duplicate_window: float | None = None


@dataclass(frozen=True)
class Channel(Generic[ModelT]):
    """One subject (template) and the model every message on it has.

    `stream` None: core NATS request/reply; `reply` is then the model of the answer.
    """

    subject: str
    model: type[ModelT]
    description: str
    stream: Stream | None = None
    reply: type[BaseModel] | None = None

    def address(self, **tokens: str) -> str:
        """The concrete subject, e.g. `SANDBOX_EVENTS.address(sandbox_id="abc")`; KeyError: token missing."""
        return _TOKEN.sub(lambda match: tokens[match.group(1)], self.subject)

    @property
    def filter(self) -> str:
        """What a consumer of every instance of the template subscribes to (`a.b.{x}` -> `a.b.>`)."""
        head, brace, _ = self.subject.partition("{")
        return f"{head}>" if brace else self.subject


@dataclass(frozen=True)
class Bucket(Generic[ModelT]):
    """A KV bucket: key -> model. `ttl` (seconds): entries vanish unless rewritten within it (None: kept)."""

    name: str
    model: type[ModelT]
    key: str
    description: str
    ttl: float | None = None


INTENTS = Stream(
    subjects.INTENTS_STREAM, "workqueue", "API -> scheduler: desired-state changes", duplicate_window=120.0
)
JOBS = Stream(
    subjects.JOBS_STREAM,
    "workqueue",
    "scheduler -> runner, API -> builder: durable work",
    duplicate_window=120.0,
)
EVENTS = Stream(
    subjects.EVENTS_STREAM,
    "limits",
    "runner / builder / scheduler -> API and telemetry: actual state, replayable",
    max_age=7 * 24 * 3600.0,
    duplicate_window=120.0,
)
BUILD_LOGS = Stream(
    subjects.BUILD_LOGS_STREAM,
    "limits",
    "builder -> API: build output, replayable from the start",
    max_age=2 * 24 * 3600.0,
    max_msgs_per_subject=200_000,
)
# The telemetry service sets max_age from its settings (TIDEPOOL_SANDBOX_METRICS_RETENTION_SECONDS) at start.
SANDBOX_METRICS_SAMPLES = Stream(
    subjects.SANDBOX_METRICS_STREAM,
    "limits",
    "runner -> telemetry: per-sandbox resource samples, kept for the retention period (default 3 days)",
    max_age=3 * 24 * 3600.0,
)
# The webhook outbox: a change committed to the database is relayed here (tidepool_api.webhook_delivery),
# so it survives restarts of the API until the fan-out has turned it into deliveries.
WEBHOOKS = Stream(
    subjects.WEBHOOKS_STREAM,
    "limits",
    "API -> its webhook fan-out: committed changes for organizations' webhook endpoints",
    max_age=7 * 24 * 3600.0,
    duplicate_window=600.0,
)
SANDBOX_FLOW_LOG = Stream(
    subjects.SANDBOX_FLOWS_STREAM,
    "limits",
    "runner -> API: per-sandbox network flows (new connections a network policy allowed or denied)",
    max_age=3 * 24 * 3600.0,
    max_msgs_per_subject=10_000,
)
STREAMS: tuple[Stream, ...] = (
    INTENTS,
    JOBS,
    EVENTS,
    BUILD_LOGS,
    SANDBOX_METRICS_SAMPLES,
    WEBHOOKS,
    SANDBOX_FLOW_LOG,
)

SANDBOX_INTENTS = Channel(
    f"{subjects.INTENT_SANDBOX_PREFIX}.{{sandbox_id}}",
    SandboxIntent,
    "API -> scheduler: create / start / stop / destroy a sandbox (work queue)",
    INTENTS,
)
RUNNER_JOBS = Channel(
    f"{subjects.JOB_RUNNER_PREFIX}.{{runner_id}}",
    RunnerJob,
    "scheduler -> the runner a sandbox is placed on: what to do with its container",
    JOBS,
)
BUILD_JOBS = Channel(
    subjects.JOB_BUILD_SUBJECT, BuildJob, "API -> builder: pull, build or evict a snapshot's image", JOBS
)
SANDBOX_EVENTS = Channel(
    f"{subjects.EVENT_SANDBOX_PREFIX}.{{sandbox_id}}",
    SandboxStateEvent,
    "runner / scheduler -> API, telemetry: a sandbox's actual state",
    EVENTS,
)
SNAPSHOT_EVENTS = Channel(
    f"{subjects.EVENT_SNAPSHOT_PREFIX}.{{snapshot}}",
    SnapshotEvent,
    "builder -> API: a snapshot's build state (`snapshot`: its kv_safe name)",
    EVENTS,
)
PROCESS_EVENTS = Channel(
    f"{subjects.EVENT_PROCESS_PREFIX}.{{sandbox_id}}",
    ProcessTerminationEvent,
    "runner -> API: a notable process ending in a sandbox (signal, timeout, OOM kill)",
    EVENTS,
)
DAEMON_EVENTS = Channel(
    f"{subjects.EVENT_DAEMON_PREFIX}.{{sandbox_id}}",
    DaemonHealthEvent,
    "runner -> API: a sandbox's toolbox daemon restarted, failed to restart or recovered",
    EVENTS,
)
BUILD_LOG_LINES = Channel(
    f"{subjects.BUILD_LOG_PREFIX}.{{image}}",
    BuildLogLine,
    "builder -> API (replayed per request of a build log): build output of an image (`image`: kv_safe ref)",
    BUILD_LOGS,
)
REGISTRY_CREDENTIALS = Channel(
    subjects.REGISTRY_CREDENTIALS_SUBJECT,
    RegistryCredentialsRequest,
    "builder -> API (request/reply): pull credentials of an organization's private registry; never stored",
    reply=RegistryCredentialsReply,
)
SANDBOX_METRICS = Channel(
    f"{subjects.SANDBOX_METRICS_PREFIX}.{{sandbox_id}}",
    SandboxMetricsSample,
    "runner -> telemetry (read back per query): a running sandbox's CPU, memory, disk and network sample",
    SANDBOX_METRICS_SAMPLES,
)
SANDBOX_METRICS_QUERY = Channel(
    subjects.SANDBOX_METRICS_QUERY_SUBJECT,
    SandboxMetricsQuery,
    "API -> telemetry (request/reply): one sandbox's stored samples as series (the API checked the tenant)",
    reply=SandboxMetricsReply,
)
WEBHOOK_EVENTS = Channel(
    f"{subjects.WEBHOOK_EVENT_PREFIX}.{{organization_id}}",
    WebhookEvent,
    "API -> API: a committed change for an organization's webhook endpoints (the outbox, replayable)",
    WEBHOOKS,
)
SANDBOX_FLOWS = Channel(
    f"{subjects.SANDBOX_FLOW_PREFIX}.{{sandbox_id}}",
    SandboxFlow,
    "runner -> API (read back per request): a new connection of a sandbox with a network policy, allowed or "
    "denied, and the rule that decided",
    SANDBOX_FLOW_LOG,
)
CHANNELS: tuple[Channel, ...] = (
    SANDBOX_INTENTS,
    RUNNER_JOBS,
    BUILD_JOBS,
    SANDBOX_EVENTS,
    SNAPSHOT_EVENTS,
    PROCESS_EVENTS,
    DAEMON_EVENTS,
    BUILD_LOG_LINES,
    REGISTRY_CREDENTIALS,
    SANDBOX_METRICS,
    SANDBOX_METRICS_QUERY,
    WEBHOOK_EVENTS,
    SANDBOX_FLOWS,
)

RUNNERS = Bucket(
    subjects.KV_RUNNERS,
    RunnerInfo,
    "runner_id",
    "runner -> scheduler: capacity; expires without heartbeats",
    30.0,
)
RUNNER_CONTROLS = Bucket(
    subjects.KV_RUNNER_CONTROLS,
    RunnerControl,
    "runner_id",
    "API -> scheduler: runners the admin cordoned or is draining (no new placements)",
)
ROUTES = Bucket(
    subjects.KV_ROUTES, SandboxRoute, "sandbox_id", "runner -> proxy, scheduler: where a sandbox runs"
)
PLACEMENTS = Bucket(
    subjects.KV_PLACEMENTS, Placement, "sandbox_id", "scheduler's memory of placements and jobs"
)
DESIRED = Bucket(
    subjects.KV_DESIRED, DesiredSandbox, "sandbox_id", "API -> scheduler: what a sandbox should be"
)
API_KEYS = Bucket(
    subjects.KV_API_KEYS, ApiKeyRecord, "sha256(key)", "API -> proxy: API keys, checked without the database"
)
SIGNING_KEYS = Bucket(
    subjects.KV_SIGNING_KEYS, SigningKeyRecord, "sandbox_id", "API -> proxy: keys of signed file URLs"
)
ACTIVITY = Bucket(
    subjects.KV_ACTIVITY,
    SandboxActivity,
    "sandbox_id",
    "runner -> scheduler: last toolbox use of a sandbox (written at most every few seconds)",
)
PREVIEWS = Bucket(
    subjects.KV_PREVIEWS,
    PreviewAccess,
    "sandbox_id",
    "API -> proxy: who may open a sandbox's previews (public flag, preview token hash)",
)
# Signed preview URLs live at most 24 hours; the bucket forgets them a little after that.
SIGNED_PREVIEWS = Bucket(
    subjects.KV_SIGNED_PREVIEWS,
    SignedPreview,
    "sha256(token)",
    "API -> proxy: signed preview URLs (deleted when expired early)",
    25 * 3600.0,
)
SSH_ACCESS = Bucket(
    subjects.KV_SSH_ACCESS,
    SshAccessGrant,
    "sha256(token)",
    "API -> SSH gateway: SSH access tokens (deleted when revoked)",
)
SCHEDULER_LEASE = Bucket(
    subjects.KV_SCHEDULER_LEASE,
    SchedulerLease,
    "leader",
    "scheduler replicas: which one leads (runs reconciliation and lifecycle timers)",
)
ORGANIZATION_TELEMETRY = Bucket(
    subjects.KV_ORGANIZATION_TELEMETRY,
    OrganizationTelemetry,
    "organization_id",
    "API -> telemetry: an organization's OTLP destination (headers sealed) and quotas",
)
BUCKETS: tuple[Bucket, ...] = (
    RUNNERS,
    RUNNER_CONTROLS,
    ROUTES,
    PLACEMENTS,
    DESIRED,
    API_KEYS,
    SIGNING_KEYS,
    ACTIVITY,
    PREVIEWS,
    SIGNED_PREVIEWS,
    SSH_ACCESS,
    SCHEDULER_LEASE,
    ORGANIZATION_TELEMETRY,
)


def stream_subjects(stream: Stream) -> list[str]:
    """The subjects a stream captures: the filters of its channels."""
    return [channel.filter for channel in CHANNELS if channel.stream == stream]
