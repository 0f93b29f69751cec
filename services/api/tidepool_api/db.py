"""Persistence: SQLModel tables (PostgreSQL in production, SQLite embedded) and the session factory."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, UniqueConstraint, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp_column() -> Any:
    return Field(default_factory=utc_now, sa_column=Column(DateTime(timezone=True), nullable=False))


class Organization(SQLModel, table=True):
    __tablename__ = "organization"

    id: str = Field(primary_key=True)
    name: str
    max_cpu_per_sandbox: int = 4
    max_memory_per_sandbox: int = 8
    max_disk_per_sandbox: int = 10
    # Quotas (behaviour spec "limits"); None = the installation's default (its tier, tidepool_api.quotas).
    total_cpu_quota: int | None = None  # vCPU of sandboxes using compute
    total_memory_quota: int | None = None  # GiB
    total_disk_quota: int | None = None  # GiB of sandboxes using storage (not archived)
    snapshot_quota: int | None = None
    max_snapshot_size: int | None = None  # GB
    volume_quota: int | None = None
    # Rate-limit overrides: requests per `*_ttl_seconds` window (None = the installation's).
    authenticated_rate_limit: int | None = None
    sandbox_create_rate_limit: int | None = None
    sandbox_lifecycle_rate_limit: int | None = None
    authenticated_rate_limit_ttl_seconds: int | None = None
    sandbox_create_rate_limit_ttl_seconds: int | None = None
    sandbox_lifecycle_rate_limit_ttl_seconds: int | None = None
    # The operator's organization (created by the first start): it alone manages organizations.
    is_admin: bool = False
    # Set when the admin deletes the organization: its keys are revoked, its resources removed; the row
    # stays as the record of the deletion (sandbox rows still refer to it).
    deleted_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    created_at: datetime = timestamp_column()
    # `PUT /organizations/{id}/otel-config`: where its metrics go; the headers (a JSON object, they often
    # hold an API key) sealed by the API's SecretBox.
    otel_endpoint: str | None = None
    otel_headers_sealed: str | None = None


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(primary_key=True)
    organization_id: str = Field(foreign_key="organization.id", index=True)
    name: str
    # sha256 of the key: the key itself is shown once and never stored.
    key_hash: str = Field(unique=True, index=True)
    key_prefix: str
    created_at: datetime = timestamp_column()
    expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    revoked: bool = False
    # Scopes (`tidepool_contracts.permissions`), in the enum's order; reads need none.
    permissions: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    last_used_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class Snapshot(SQLModel, table=True):
    __tablename__ = "snapshot"
    __table_args__ = (UniqueConstraint("organization_id", "name", name="uq_snapshot_org_name"),)

    id: str = Field(primary_key=True)
    # None = a general snapshot every organization may use.
    organization_id: str | None = Field(default=None, index=True)
    name: str
    # What the user asked for (an image reference), or None for a Dockerfile build.
    image_name: str
    # The local image runners start: the source image, or a content-addressed build ref.
    ref: str | None = Field(default=None, index=True)
    # The same image in the platform registry: what runners pull when they do not have `ref`.
    registry_ref: str | None = None
    # Builds made for `POST /sandbox` with buildInfo: cached, not listed to users.
    hidden: bool = False
    dockerfile: str | None = None
    context_hashes: list[str] | None = Field(default=None, sa_column=Column(JSON))
    entrypoint: list[str] | None = Field(default=None, sa_column=Column(JSON))
    size_bytes: int | None = Field(default=None, sa_column=Column(BigInteger))
    last_used_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    state: str
    cpu: int = 1
    memory: int = 1
    disk: int = 3
    general: bool = False
    error_reason: str | None = None
    created_at: datetime = timestamp_column()
    updated_at: datetime = timestamp_column()


class Sandbox(SQLModel, table=True):
    __tablename__ = "sandbox"
    __table_args__ = (
        UniqueConstraint("organization_id", "name", name="uq_sandbox_org_name"),
        Index("ix_sandbox_org_created", "organization_id", "created_at"),
    )

    id: str = Field(primary_key=True)
    organization_id: str = Field(foreign_key="organization.id")
    name: str
    state: str
    desired_state: str
    snapshot: str | None = None
    image: str
    # Set while the sandbox waits for its declarative image to be built.
    build_ref: str | None = Field(default=None, index=True)
    # The snapshot's entrypoint, run by the toolbox daemon in the "entrypoint" session.
    entrypoint: list[str] | None = Field(default=None, sa_column=Column(JSON))
    os_user: str = "daytona"
    env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    cpu: int
    memory: int
    disk: int
    public: bool = False
    network_block_all: bool = False
    # As given (comma-separated), shown back in the DTO; the runner gets them split (SandboxSpec).
    network_allow_list: str | None = None
    domain_allow_list: str | None = None
    target: str = "us"
    auto_stop_interval: int = 15
    auto_archive_interval: int = 10080
    auto_delete_interval: int = -1
    error_reason: str | None = None
    # Set with `error` by the runner: a stop and a start bring the sandbox back (shown only while in error).
    recoverable: bool = False
    # HMAC key of signed file URLs (created on first use, replaced on rotation).
    signing_key: str | None = None
    # Token of private preview URLs (X-Daytona-Preview-Token), replaced on every start; the proxy knows
    # only its hash (KV `tidepool_previews`).
    preview_token: str | None = None
    # Volume mounts as given at create time (resolved to ids): [{volumeId, mountPath, subpath}].
    volumes: list[dict[str, str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    runner_id: str | None = None
    daemon_version: str | None = None
    # The sandbox this one was forked from (a parent with live forks cannot be deleted).
    parent_id: str | None = Field(default=None, index=True)
    # The warm pool this sandbox waits in, set only while it is an unclaimed member (its organization is
    # then WARM_POOL_ORGANIZATION_ID); cleared by the claim.
    warm_pool_id: str | None = Field(default=None, index=True)
    # Claimed from a warm pool: its container was created with the pool's env, so the runner gives the
    # daemon this sandbox's env after every start (SandboxSpec.claimed).
    claimed: bool = False
    created_at: datetime = timestamp_column()
    updated_at: datetime = timestamp_column()
    last_activity_at: datetime = timestamp_column()


# Owner of unclaimed warm-pool sandboxes (Daytona's "unassigned" organization): no API key belongs to it, so
# no tenant lists, counts or reaches them; a claim moves a sandbox to the claimer's organization.
WARM_POOL_ORGANIZATION_ID = "00000000-0000-0000-0000-000000000000"


class WarmPool(SQLModel, table=True):
    """A pool an organization made with `POST /warm-pools` (wire contract §2.8). The operator's configured
    pools (setting `warm_pool_snapshots`) are rows too, owned by the admin organization, `configured`."""

    __tablename__ = "warm_pool"
    __table_args__ = (UniqueConstraint("organization_id", "snapshot_id", "target", name="uq_warm_pool"),)

    id: str = Field(primary_key=True)
    organization_id: str = Field(foreign_key="organization.id", index=True)
    snapshot_id: str
    snapshot: str  # its name, as the SDK shows it
    image: str
    target: str
    # The floor: at least this many members are kept started; recent demand may raise it to the ceiling.
    pool: int
    cpu: int
    memory: int
    disk: int
    os_user: str = "daytona"
    configured: bool = False
    error_reason: str | None = None
    created_at: datetime = timestamp_column()
    updated_at: datetime = timestamp_column()


class Volume(SQLModel, table=True):
    """A persistent, shareable folder in the organization's object storage (`volumes/<id>/` in its bucket);
    runners FUSE-mount it into sandboxes. A deleted row stays as the record and frees its name."""

    __tablename__ = "volume"
    __table_args__ = (
        Index(
            "uq_volume_org_name_live",
            "organization_id",
            "name",
            unique=True,
            postgresql_where=text("state <> 'deleted'"),
            sqlite_where=text("state <> 'deleted'"),
        ),
    )

    id: str = Field(primary_key=True)
    organization_id: str = Field(foreign_key="organization.id", index=True)
    name: str
    state: str
    error_reason: str | None = None
    created_at: datetime = timestamp_column()
    updated_at: datetime = timestamp_column()
    last_used_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class SshAccess(SQLModel, table=True):
    """An SSH access token of a sandbox (`ssh <token>@gateway`). Only its SHA-256 is kept; the token itself
    is shown once, by the create call. Revoked tokens are deleted (and so forgotten by the gateway)."""

    __tablename__ = "ssh_access"

    id: str = Field(primary_key=True)
    sandbox_id: str = Field(foreign_key="sandbox.id", index=True)
    token_hash: str = Field(unique=True)
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    created_at: datetime = timestamp_column()
    updated_at: datetime = timestamp_column()


class DockerRegistry(SQLModel, table=True):
    """An organization's private registry; the password is encrypted (see secrets_box.py)."""

    __tablename__ = "docker_registry"
    __table_args__ = (UniqueConstraint("organization_id", "name", name="uq_registry_org_name"),)

    id: str = Field(primary_key=True)
    organization_id: str = Field(foreign_key="organization.id", index=True)
    name: str
    url: str
    username: str
    password_sealed: str
    project: str = ""
    registry_type: str = "organization"
    created_at: datetime = timestamp_column()
    updated_at: datetime = timestamp_column()


class SandboxEvent(SQLModel, table=True):
    """What happened to a sandbox: state changes and notable process endings (signal, timeout, OOM kill)."""

    __tablename__ = "sandbox_event"
    __table_args__ = (
        UniqueConstraint("sandbox_id", "dedupe_key", name="uq_sandbox_event_dedupe"),
        Index("ix_sandbox_event_sandbox_time", "sandbox_id", "occurred_at"),
    )

    id: str = Field(primary_key=True)
    sandbox_id: str
    organization_id: str
    type: str  # sandbox.state.updated | sandbox.process.terminated
    # Redelivered bus messages map to the same key and are stored once.
    dedupe_key: str
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    occurred_at: datetime = timestamp_column()


class AuditLog(SQLModel, table=True):
    """Who did what (Daytona's `AuditLog`): written before the handler runs, completed with its outcome."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_organization_time", "organization_id", "created_at"),)

    id: str = Field(primary_key=True)
    organization_id: str
    # No users in Tidepool: the actor is the API key (its id; its first characters for display).
    actor_id: str
    actor_api_key_prefix: str | None = None
    action: str  # create | delete | update | start | stop | labels | ... (from the route)
    target_type: str | None = None  # sandbox | snapshot | docker_registry | api_key | organization | ...
    target_id: str | None = None
    status_code: int | None = None
    error_message: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    source: str | None = None  # X-Daytona-Source
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    created_at: datetime = timestamp_column()


class WebhookEndpoint(SQLModel, table=True):
    """Where an organization's webhook messages go (README "Webhooks"); the signing secret sealed by the
    API's SecretBox, shown once (at creation and rotation)."""

    __tablename__ = "webhook_endpoint"

    id: str = Field(primary_key=True)
    organization_id: str = Field(foreign_key="organization.id", index=True)
    url: str
    description: str = ""
    # Event types it receives; empty: all of them.
    event_types: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    secret_sealed: str
    created_at: datetime = timestamp_column()
    updated_at: datetime = timestamp_column()


class WebhookOutbox(SQLModel, table=True):
    """A change, written in the transaction that made it; relayed to the bus (channel WEBHOOK_EVENTS) and
    removed. `seq` orders one resource's changes (a later change commits after the earlier one)."""

    __tablename__ = "webhook_outbox"
    # SQLite's AUTOINCREMENT: without it a rowid is reused once the relay has emptied the table.
    __table_args__ = {"sqlite_autoincrement": True}

    seq: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    id: str = Field(unique=True)  # the message id (webhook-id)
    organization_id: str
    event_type: str
    ordering_key: str
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    occurred_at: datetime = timestamp_column()


class WebhookDelivery(SQLModel, table=True):
    """One message for one endpoint: pending until delivered (2xx) or given up (failed). Within an
    endpoint, a resource's (`ordering_key`) messages go one at a time in `sequence` order."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "message_id", name="uq_webhook_delivery_message"),
        Index("ix_webhook_delivery_queue", "endpoint_id", "ordering_key", "status", "sequence"),
        Index("ix_webhook_delivery_due", "status", "next_attempt_at"),
    )

    id: str = Field(primary_key=True)
    endpoint_id: str
    organization_id: str
    message_id: str
    event_type: str
    ordering_key: str
    sequence: int = Field(sa_column=Column(BigInteger, nullable=False))
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "pending"  # pending | delivered | failed
    attempts: int = 0
    next_attempt_at: datetime = timestamp_column()
    created_at: datetime = timestamp_column()


class WebhookAttempt(SQLModel, table=True):
    """One HTTP attempt of a delivery: the delivery log (`GET /webhooks/endpoints/{id}/attempts`)."""

    __tablename__ = "webhook_attempt"
    __table_args__ = (Index("ix_webhook_attempt_endpoint_time", "endpoint_id", "attempted_at"),)

    id: str = Field(primary_key=True)
    delivery_id: str
    endpoint_id: str
    organization_id: str
    message_id: str
    event_type: str
    attempt: int
    status_code: int | None = None
    error: str | None = None
    duration_ms: int
    attempted_at: datetime = timestamp_column()


class Database:
    def __init__(self, url: str) -> None:
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # The event consumer and request handlers write concurrently: wait for the lock, do not fail.
            connect_args = {"timeout": 30}
        self.engine: AsyncEngine = create_async_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers proceed while the event consumer writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
