"""NATS subjects, JetStream streams and KV buckets by name; `channels.py` pairs each with its model."""

from __future__ import annotations

# JetStream streams.
INTENTS_STREAM = "TIDEPOOL_INTENTS"  # API -> scheduler: desired-state changes (work queue)
JOBS_STREAM = "TIDEPOOL_JOBS"  # scheduler -> runner, API -> builder: durable work (work queue)
EVENTS_STREAM = "TIDEPOOL_EVENTS"  # runner/builder -> everyone: actual state (fan-out, replayable)
BUILD_LOGS_STREAM = "TIDEPOOL_BUILD_LOGS"  # builder -> API: build output, replayable from the start
SANDBOX_METRICS_STREAM = "TIDEPOOL_SANDBOX_METRICS"  # runner -> telemetry: resource samples, kept 3 days
WEBHOOKS_STREAM = "TIDEPOOL_WEBHOOKS"  # API -> its webhook fan-out: the outbox of committed changes
SANDBOX_FLOWS_STREAM = "TIDEPOOL_SANDBOX_FLOWS"  # runner -> API: per-sandbox network flow log, kept 3 days

INTENT_SANDBOX_PREFIX = "tidepool.intent.sandbox"
JOB_RUNNER_PREFIX = "tidepool.job.runner"
JOB_BUILD_SUBJECT = "tidepool.job.build"
EVENT_SANDBOX_PREFIX = "tidepool.event.sandbox"
EVENT_SNAPSHOT_PREFIX = "tidepool.event.snapshot"
EVENT_PROCESS_PREFIX = "tidepool.event.process"  # runner -> API: notable process terminations in sandboxes
EVENT_DAEMON_PREFIX = "tidepool.event.daemon"  # runner -> API: toolbox daemon health (restarts, failures)
BUILD_LOG_PREFIX = "tidepool.buildlog"
SANDBOX_METRICS_PREFIX = "tidepool.metrics.sandbox"  # runner -> telemetry: one subject per sandbox
WEBHOOK_EVENT_PREFIX = "tidepool.webhook.event"  # API outbox -> webhook fan-out: one subject per organization
SANDBOX_FLOW_PREFIX = "tidepool.flow.sandbox"  # runner -> API: one subject per sandbox

# Core NATS request/reply (caller waits). Builder -> API: pull credentials of an organization's private
# registry (never stored on the bus).
REGISTRY_CREDENTIALS_SUBJECT = "tidepool.rpc.registry.credentials"
# API -> telemetry: a sandbox's stored resource samples.
SANDBOX_METRICS_QUERY_SUBJECT = "tidepool.rpc.telemetry.sandbox_metrics"

# KV buckets (shared read models).
KV_RUNNERS = "tidepool_runners"  # runner id -> RunnerInfo (expires without heartbeats)
KV_RUNNER_CONTROLS = "tidepool_runner_controls"  # runner id -> RunnerControl (admin's cordon/drain)
KV_ROUTES = "tidepool_routes"  # sandbox id -> SandboxRoute (proxy reads this, never the DB)
KV_PLACEMENTS = "tidepool_placements"  # sandbox id -> Placement (scheduler's memory)
KV_DESIRED = "tidepool_desired"  # sandbox id -> DesiredSandbox (API writes, scheduler reconciles)
KV_API_KEYS = "tidepool_api_keys"  # sha256(key) -> ApiKeyRecord (proxy authenticates without the DB)
KV_ACTIVITY = "tidepool_activity"  # sandbox id -> SandboxActivity (runner writes, scheduler's timers read)
KV_SIGNING_KEYS = "tidepool_signing_keys"  # sandbox id -> SigningKeyRecord (proxy verifies signed file URLs)
KV_PREVIEWS = "tidepool_previews"  # sandbox id -> PreviewAccess (public flag, preview token hash)
KV_SIGNED_PREVIEWS = "tidepool_signed_previews"  # sha256(token) -> SignedPreview (signed preview URLs)
KV_SSH_ACCESS = "tidepool_ssh_access"  # sha256(token) -> SshAccessGrant (SSH gateway logins)
KV_SCHEDULER_LEASE = "tidepool_scheduler_lease"  # "leader" -> SchedulerLease (which scheduler replica leads)
# organization id -> OrganizationTelemetry (API writes, telemetry exports to it)
KV_ORGANIZATION_TELEMETRY = "tidepool_organization_telemetry"


def intent_sandbox(sandbox_id: str) -> str:
    return f"{INTENT_SANDBOX_PREFIX}.{sandbox_id}"


def job_runner(runner_id: str) -> str:
    return f"{JOB_RUNNER_PREFIX}.{runner_id}"


def event_sandbox(sandbox_id: str) -> str:
    return f"{EVENT_SANDBOX_PREFIX}.{sandbox_id}"


def event_process(sandbox_id: str) -> str:
    return f"{EVENT_PROCESS_PREFIX}.{sandbox_id}"


def event_daemon(sandbox_id: str) -> str:
    return f"{EVENT_DAEMON_PREFIX}.{sandbox_id}"


def event_snapshot(snapshot_name: str) -> str:
    return f"{EVENT_SNAPSHOT_PREFIX}.{kv_safe(snapshot_name)}"


def build_log(image_ref: str) -> str:
    return f"{BUILD_LOG_PREFIX}.{kv_safe(image_ref)}"


def kv_safe(name: str) -> str:
    """KV keys and subject tokens allow only [-_=/.A-Za-z0-9]; escape everything else."""
    allowed = set("-_=abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return "".join(ch if ch in allowed else f"={ord(ch):02x}" for ch in name)
