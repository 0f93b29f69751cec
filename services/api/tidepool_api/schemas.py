"""Wire models of the Daytona-compatible API (camelCase on the wire, as SDK 0.226.1 sends and expects).

Request models validate every field at the edge (issue #9 item 2): a bad value is a 400 whose message names
the field (`errors.describe_validation_error`), before anything is written or published. Field names and
types follow the SDK's generated models (`daytona_api_client.models.CreateSandbox`, ...); integers and
booleans are strict as there (`"cpu": "2"` or `"public": "yes"` is refused). Unknown fields are ignored, as
Daytona's API does. Where Daytona documents no limit, the limits below are Tidepool's: they keep every intent
small enough for the bus (NATS max payload 1 MiB) and every value usable by the runner (env, user, names).

Response models describe what the routes return (the `*_dto` functions build exactly these shapes; a unit
test checks that), so `/api/openapi.json` documents bodies and the 4xx answers.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from tidepool_api.db import (
    Sandbox,
    Snapshot,
    Volume,
    WarmPool,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from tidepool_contracts.states import SandboxState

# Limits where Daytona documents none (units: characters, entries, minutes).
INT32_MAX = 2**31 - 1  # every integer column is a 32-bit integer in PostgreSQL
NAME_MAX = 255
USER_PATTERN = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")  # POSIX portable user name, as useradd accepts
ENV_MAX_ENTRIES = 512
ENV_KEY_MAX = 256
ENV_VALUE_MAX = 32 * 1024
ENV_TOTAL_MAX = 256 * 1024
# env and labels travel in every intent and desired-state record: bounded so that each fits one NATS message
# (1 MiB max payload) with room to spare, whatever their characters serialize to.
SPEC_JSON_MAX = 512 * 1024
LABELS_MAX_ENTRIES = 64
LABEL_KEY_MAX = 256
LABEL_VALUE_MAX = 1024
DOCKERFILE_MAX = 256 * 1024
CONTEXT_HASHES_MAX = 1024
CONTEXT_HASH = re.compile(r"^[0-9a-f]{32,128}$")  # hex digests (the Python SDK sends MD5, others SHA-256)
NETWORK_ALLOW_LIST_MAX = 10  # Daytona: "Network allow list cannot contain more than 10 networks"
ENTRYPOINT_MAX_ENTRIES = 64
ENTRYPOINT_ARG_MAX = 4096
SECRET_MAX = 8192
URL_MAX = 2048
QUERY_TEXT_MAX = 512
SNAPSHOT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._:/@-]{0,254}$")
TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def invalid(message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message, context)


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def no_control(value: str) -> str:
    if CONTROL.search(value):
        raise invalid("must not contain control characters (NUL, newline, ...)")
    return value


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise invalid("must not contain NUL")
    return value


def sandbox_name(value: str) -> str:
    if not value.strip():
        raise invalid("must not be empty")
    if len(value) > NAME_MAX:
        raise invalid("must be at most {limit} characters", limit=NAME_MAX)
    if "/" in value:
        raise invalid("must not contain '/'")
    return no_control(value)


def plain_name(value: str) -> str:
    """A display name (organization, registry, API key): 1..255 characters, no '/', no control characters."""
    return sandbox_name(value)


def posix_user(value: str) -> str:
    if not USER_PATTERN.match(value):
        raise invalid(
            "must be a POSIX user name (a-z, 0-9, _ or -; not starting with a digit or -; at most 32)"
        )
    return value


def env_map(value: dict[str, str]) -> dict[str, str]:
    if len(value) > ENV_MAX_ENTRIES:
        raise invalid("at most {limit} variables", limit=ENV_MAX_ENTRIES)
    total = 0
    for key, item in value.items():
        if not key or len(key) > ENV_KEY_MAX:
            raise invalid("key {key} must be 1 to {limit} characters", key=_shown(key), limit=ENV_KEY_MAX)
        if "\x00" in key or "=" in key:
            raise invalid("key {key} must not contain NUL or '='", key=_shown(key))
        if "\x00" in item:
            raise invalid("value of {key} must not contain NUL", key=_shown(key))
        if len(item) > ENV_VALUE_MAX:
            raise invalid(
                "value of {key} must be at most {limit} characters", key=_shown(key), limit=ENV_VALUE_MAX
            )
        total += len(key) + len(item)
    if total > ENV_TOTAL_MAX:
        raise invalid("keys and values must total at most {limit} characters", limit=ENV_TOTAL_MAX)
    return value


def label_map(value: dict[str, str]) -> dict[str, str]:
    if len(value) > LABELS_MAX_ENTRIES:
        raise invalid("at most {limit} labels", limit=LABELS_MAX_ENTRIES)
    for key, item in value.items():
        if not key or len(key) > LABEL_KEY_MAX:
            raise invalid("key {key} must be 1 to {limit} characters", key=_shown(key), limit=LABEL_KEY_MAX)
        if CONTROL.search(key):
            raise invalid("key {key} must not contain control characters", key=_shown(key))
        if len(item) > LABEL_VALUE_MAX:
            raise invalid(
                "value of {key} must be at most {limit} characters", key=_shown(key), limit=LABEL_VALUE_MAX
            )
        if "\x00" in item:
            raise invalid("value of {key} must not contain NUL", key=_shown(key))
    return value


def context_hashes(value: list[str]) -> list[str]:
    if len(value) > CONTEXT_HASHES_MAX:
        raise invalid("at most {limit} hashes", limit=CONTEXT_HASHES_MAX)
    for item in value:
        if not CONTEXT_HASH.match(item):
            raise invalid("{item} is not a hex digest", item=_shown(item))
    return value


def dockerfile(value: str) -> str:
    if not value.strip():
        raise invalid("must not be empty")
    if len(value) > DOCKERFILE_MAX:
        raise invalid("must be at most {limit} characters", limit=DOCKERFILE_MAX)
    return no_nul(value)


def snapshot_name(value: str) -> str:
    if not SNAPSHOT_NAME.match(value):
        raise invalid(
            "may contain letters, digits, dots, colons, slashes, @ and dashes only (1 to 255, "
            "starting with a letter or digit)"
        )
    return value


def target(value: str) -> str:
    if not TARGET.match(value):
        raise invalid("must be a region name: letters, digits, '.', '_' or '-', at most 64 characters")
    return value


def network_allow_list(value: str) -> str:
    """Comma-separated CIDRs (`10.0.0.0/8,192.168.1.0/24`), at most 10; empty entries are skipped."""
    entries = value.split(",")
    if len(entries) > NETWORK_ALLOW_LIST_MAX:
        raise invalid(
            "Network allow list cannot contain more than {limit} networks", limit=NETWORK_ALLOW_LIST_MAX
        )
    for entry in (item.strip() for item in entries):
        if not entry:
            continue
        if "/" not in entry:
            raise invalid("Missing CIDR prefix length in {entry}", entry=_shown(entry))
        try:
            # IPv4 only, as Daytona: hostnames, domains and IPv6 are refused.
            ipaddress.IPv4Network(entry, strict=False)
        except ValueError:
            raise invalid("Invalid network {entry}: an IPv4 CIDR is expected", entry=_shown(entry)) from None
    return value


_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def domain_allow_list(value: str) -> str:
    """Comma-separated domains (`pypi.org,*.github.com`), at most 10; empty entries are skipped. A `*.`
    prefix allows the domain's subdomains."""
    entries = value.split(",")
    if len(entries) > NETWORK_ALLOW_LIST_MAX:
        raise invalid(
            "Domain allow list cannot contain more than {limit} domains", limit=NETWORK_ALLOW_LIST_MAX
        )
    for entry in (item.strip() for item in entries):
        if not entry:
            continue
        name = entry[2:] if entry.startswith("*.") else entry
        labels = name.rstrip(".").split(".")
        if len(name) > 253 or len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
            raise invalid("Invalid domain {entry}", entry=_shown(entry))
    return value


def split_list(value: str | None) -> list[str]:
    """The non-empty, trimmed entries of a comma-separated allow list."""
    return [entry.strip() for entry in (value or "").split(",") if entry.strip()]


def entrypoint(value: list[str]) -> list[str]:
    if len(value) > ENTRYPOINT_MAX_ENTRIES:
        raise invalid("at most {limit} arguments", limit=ENTRYPOINT_MAX_ENTRIES)
    for item in value:
        if len(item) > ENTRYPOINT_ARG_MAX or "\x00" in item:
            raise invalid(
                "arguments must be at most {limit} characters, without NUL", limit=ENTRYPOINT_ARG_MAX
            )
    return value


SandboxName = Annotated[StrictStr, AfterValidator(sandbox_name)]
PlainName = Annotated[StrictStr, AfterValidator(plain_name)]
PosixUser = Annotated[StrictStr, AfterValidator(posix_user)]
EnvMap = Annotated[dict[StrictStr, StrictStr], AfterValidator(env_map)]
LabelMap = Annotated[dict[StrictStr, StrictStr], AfterValidator(label_map)]
ContextHashes = Annotated[list[StrictStr], AfterValidator(context_hashes)]
Dockerfile = Annotated[StrictStr, AfterValidator(dockerfile)]
SnapshotName = Annotated[StrictStr, AfterValidator(snapshot_name)]
Target = Annotated[StrictStr, AfterValidator(target)]
NetworkAllowList = Annotated[StrictStr, AfterValidator(network_allow_list)]
DomainAllowList = Annotated[StrictStr, AfterValidator(domain_allow_list)]
Entrypoint = Annotated[list[StrictStr], AfterValidator(entrypoint)]
Cores = Annotated[StrictInt, Field(ge=1, le=INT32_MAX)]
GpuCount = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
Minutes = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
# Daytona: "negative value means disabled"; the interval endpoint accepts -1 only, and so does create.
DeleteMinutes = Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)]
Text = Annotated[StrictStr, Field(max_length=NAME_MAX), AfterValidator(no_control)]
ImageName = Annotated[StrictStr, Field(min_length=1, max_length=URL_MAX), AfterValidator(no_control)]
Url = Annotated[StrictStr, Field(min_length=1, max_length=URL_MAX), AfterValidator(no_control)]
Secret = Annotated[StrictStr, Field(max_length=SECRET_MAX), AfterValidator(no_nul)]


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class VolumeMount(WireModel):
    volume_id: Text
    mount_path: Annotated[StrictStr, Field(max_length=4096), AfterValidator(no_control)]
    subpath: Annotated[StrictStr, Field(max_length=4096), AfterValidator(no_control)] | None = None


class BuildInfoRequest(WireModel):
    """`CreateBuildInfo`: a declarative build (Dockerfile plus the hashes of uploaded local context)."""

    dockerfile_content: Dockerfile
    context_hashes: ContextHashes | None = None


class CreateSandboxRequest(WireModel):
    """`CreateSandbox` (SDK 0.226.1); `{}` is valid. Fields Tidepool doesn't implement are ignored."""

    name: SandboxName | None = None
    snapshot: SnapshotName | None = None
    user: PosixUser | None = None
    env: EnvMap | None = None
    labels: LabelMap | None = None
    public: StrictBool | None = None
    target: Target | None = None
    network_block_all: StrictBool | None = None
    network_allow_list: NetworkAllowList | None = None
    domain_allow_list: DomainAllowList | None = None
    cpu: Cores | None = None
    gpu: GpuCount | None = None
    memory: Cores | None = None
    disk: Cores | None = None
    auto_stop_interval: Minutes | None = None
    auto_archive_interval: Minutes | None = None
    auto_delete_interval: DeleteMinutes | None = None
    volumes: Annotated[list[VolumeMount], Field(max_length=64)] | None = None
    build_info: BuildInfoRequest | None = None

    @model_validator(mode="after")
    def fits_one_bus_message(self) -> CreateSandboxRequest:
        size = len(orjson.dumps(self.env or {})) + len(orjson.dumps(self.labels or {}))
        if size > SPEC_JSON_MAX:
            raise invalid("env and labels: together at most {limit} bytes as JSON", limit=SPEC_JSON_MAX)
        return self


class ResizeSandboxRequest(WireModel):
    """`ResizeSandbox` (SDK 0.226.1): new cpu (cores), memory and disk (GiB); absent = unchanged."""

    cpu: Cores | None = None
    memory: Cores | None = None
    disk: Cores | None = None


class UpdateSandboxNetworkSettingsRequest(WireModel):
    """`UpdateSandboxNetworkSettings` (SDK 0.226.1, wire contract §2.2): at least one field."""

    network_block_all: StrictBool | None = None
    network_allow_list: NetworkAllowList | None = None
    domain_allow_list: DomainAllowList | None = None


class CreateSandboxSnapshotRequest(WireModel):
    """`CreateSandboxSnapshot` (SDK 0.226.1): the new snapshot's name; memory snapshots are VM-only."""

    name: str = Field(min_length=1, max_length=NAME_MAX)
    include_memory: bool | None = None


class ForkSandboxRequest(WireModel):
    """`ForkSandbox` (SDK 0.226.1): the fork's name (absent: its id)."""

    name: str | None = Field(default=None, max_length=NAME_MAX)


class ReplaceLabelsRequest(WireModel):
    """`SandboxLabels`: the full new label set."""

    labels: LabelMap


class SandboxStateFilter(StrEnum):
    """Values of `GET /sandbox?states=`: Daytona's `SandboxState` enum (some never occur in Tidepool)."""

    CREATING = "creating"
    RESTORING = "restoring"
    DESTROYED = "destroyed"
    DESTROYING = "destroying"
    STARTED = "started"
    STOPPED = "stopped"
    STARTING = "starting"
    STOPPING = "stopping"
    ERROR = "error"
    BUILD_FAILED = "build_failed"
    PENDING_BUILD = "pending_build"
    BUILDING_SNAPSHOT = "building_snapshot"
    UNKNOWN = "unknown"
    PULLING_SNAPSHOT = "pulling_snapshot"
    ARCHIVED = "archived"
    ARCHIVING = "archiving"
    RESIZING = "resizing"
    SNAPSHOTTING = "snapshotting"
    FORKING = "forking"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"


# --- Response models (documentation of what the *_dto functions build; checked by a unit test) ---


class ErrorResponse(BaseModel):
    """The Nest-style error envelope of every 4xx/5xx (errors.error_response); the SDK reads `message`."""

    statusCode: int
    message: str
    error: str
    path: str
    timestamp: str
    source: str = "DAYTONA_API"


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each code documented with the error envelope."""
    descriptions = {
        400: "Invalid input: the message names the field",
        401: "Missing or invalid API key",
        403: "Not allowed for this organization",
        404: "Not found (or owned by another organization)",
        409: "Conflict (e.g. the name is taken)",
        413: "Request body too large (TIDEPOOL_API_MAX_BODY_BYTES)",
        503: "A platform dependency is unavailable; retry",
    }
    return {code: {"model": ErrorResponse, "description": descriptions[code]} for code in codes}


class BuildInfoDto(WireModel):
    snapshot_ref: str | None
    created_at: str
    updated_at: str


class SandboxDto(WireModel):
    """`Sandbox` (daytona_api_client.models.Sandbox): every field the SDK requires, times as ISO-8601 UTC."""

    id: str
    organization_id: str
    name: str
    snapshot: str | None
    user: str
    env: dict[str, str]
    labels: dict[str, str]
    public: bool
    network_block_all: bool
    network_allow_list: str | None
    domain_allow_list: str | None
    kvm: bool
    target: str
    cpu: int
    gpu: int
    memory: int
    disk: int
    state: SandboxState
    desired_state: str | None
    error_reason: str | None
    recoverable: bool
    backup_state: str
    auto_stop_interval: int
    auto_archive_interval: int
    auto_delete_interval: int
    volumes: list[VolumeMount]
    runner_id: str | None
    daemon_version: str | None
    warm_pool_id: str | None = None
    sandbox_class: str
    toolbox_proxy_url: str
    build_info: BuildInfoDto | None
    created_at: str
    updated_at: str
    last_activity_at: str


class ListSandboxesDto(WireModel):
    items: list[SandboxDto]
    next_cursor: str | None


class SandboxLabelsDto(WireModel):
    labels: dict[str, str]


class UrlDto(WireModel):
    url: str


class SnapshotDto(WireModel):
    """`SnapshotDto`: `size` in GB, `mem` in GiB."""

    id: str
    organization_id: str | None
    general: bool
    name: str
    image_name: str | None
    ref: str | None
    state: str
    size: float | None
    entrypoint: list[str] | None
    cpu: int
    gpu: int
    mem: int
    disk: int
    error_reason: str | None
    created_at: str
    updated_at: str
    last_used_at: str | None
    region_ids: list[str]
    source_sandbox_id: str | None  # required (nullable) by the SDK; no snapshot is made from a sandbox


class CreateWarmPoolRequest(WireModel):
    """`CreateWarmPool` (wire contract §2.8)."""

    snapshot: Annotated[StrictStr, Field(min_length=1, max_length=NAME_MAX), AfterValidator(no_control)]
    pool: Annotated[StrictInt, Field(ge=1)]
    target: Annotated[StrictStr, Field(max_length=NAME_MAX), AfterValidator(no_control)] | None = None


class UpdateWarmPoolRequest(WireModel):
    pool: Annotated[StrictInt, Field(ge=0)]


class WarmPoolDto(WireModel):
    """`WarmPool` (wire contract §2.8): `pool` is the floor asked for, `currentSize` the started members."""

    id: str
    organization_id: str
    snapshot: str
    target: str
    pool: int
    current_size: int
    cpu: int
    mem: int
    disk: int
    os_user: str
    env: dict[str, str]
    error_reason: str | None = None
    created_at: str
    updated_at: str


URL_MAX = 2048


class CreateWebhookEndpointRequest(WireModel):
    """An organization's webhook endpoint (README "Webhooks"); `eventTypes` empty: every event type."""

    url: Annotated[StrictStr, Field(min_length=1, max_length=URL_MAX), AfterValidator(no_control)]
    event_types: list[StrictStr] = Field(default_factory=list, max_length=32)
    enabled: StrictBool = True
    description: Annotated[StrictStr, Field(max_length=1024), AfterValidator(no_control)] = ""


class UpdateWebhookEndpointRequest(WireModel):
    url: Annotated[StrictStr, Field(min_length=1, max_length=URL_MAX), AfterValidator(no_control)] | None = (
        None
    )
    event_types: list[StrictStr] | None = Field(default=None, max_length=32)
    enabled: StrictBool | None = None
    description: Annotated[StrictStr, Field(max_length=1024), AfterValidator(no_control)] | None = None


class WebhookEndpointDto(WireModel):
    id: str
    organization_id: str
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    created_at: str
    updated_at: str


class CreatedWebhookEndpointDto(WebhookEndpointDto):
    """At creation only: the signing secret (`whsec_...`), never shown again."""

    secret: str


class WebhookSecretDto(WireModel):
    """A rotated signing secret, shown once."""

    secret: str


class WebhookAttemptDto(WireModel):
    """One delivery attempt: `statusCode` null when no answer came (refused, timed out, blocked address).
    `error`: why it failed, in Tidepool's words (`HTTP 503 Service Unavailable`, the connection error, a
    refused non-public address); never the receiver's answer."""

    id: str
    message_id: str
    event_type: str
    attempt: int
    status_code: int | None = None
    error: str | None = None
    duration_ms: int
    attempted_at: str


class WebhookDeliveryDto(WireModel):
    """A message for the endpoint: `status` pending | delivered | failed (given up)."""

    id: str
    message_id: str
    event_type: str
    ordering_key: str
    status: str
    attempts: int
    next_attempt_at: str
    created_at: str
    payload: dict[str, Any]


class CreateVolumeRequest(WireModel):
    name: Annotated[StrictStr, Field(min_length=1, max_length=NAME_MAX), AfterValidator(no_control)]


class VolumeDto(WireModel):
    """`VolumeDto` (wire contract §2.6)."""

    id: str
    name: str
    organization_id: str
    state: str
    created_at: str
    updated_at: str
    last_used_at: str | None
    error_reason: str | None


class PaginatedSnapshotsDto(WireModel):
    items: list[SnapshotDto]
    total: int
    page: int
    total_pages: int


def iso(moment: datetime) -> str:
    # SQLite hands back naive datetimes; every stored time is UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def volume_dto(volume: Volume) -> dict[str, object]:
    return {
        "id": volume.id,
        "name": volume.name,
        "organizationId": volume.organization_id,
        "state": volume.state,
        "createdAt": iso(volume.created_at),
        "updatedAt": iso(volume.updated_at),
        "lastUsedAt": iso(volume.last_used_at) if volume.last_used_at else None,
        "errorReason": volume.error_reason,
    }


def sandbox_dto(sandbox: Sandbox, toolbox_proxy_url: str) -> dict[str, object]:
    return {
        "id": sandbox.id,
        "organizationId": sandbox.organization_id,
        "name": sandbox.name,
        "snapshot": sandbox.snapshot,
        "user": sandbox.os_user,
        "env": sandbox.env,
        "labels": sandbox.labels,
        "public": sandbox.public,
        "networkBlockAll": sandbox.network_block_all,
        "networkAllowList": sandbox.network_allow_list,
        "domainAllowList": sandbox.domain_allow_list,
        "kvm": False,
        "target": sandbox.target,
        "cpu": sandbox.cpu,
        "gpu": 0,
        "memory": sandbox.memory,
        "disk": sandbox.disk,
        "state": sandbox.state,
        "desiredState": sandbox.desired_state,
        "errorReason": sandbox.error_reason,
        "recoverable": sandbox.recoverable and sandbox.state == SandboxState.ERROR,
        "backupState": "None",
        "autoStopInterval": sandbox.auto_stop_interval,
        "autoArchiveInterval": sandbox.auto_archive_interval,
        "autoDeleteInterval": sandbox.auto_delete_interval,
        "volumes": [
            {"volumeId": m["volumeId"], "mountPath": m["mountPath"], "subpath": m.get("subpath") or None}
            for m in sandbox.volumes or []
        ],
        "runnerId": sandbox.runner_id,
        "daemonVersion": sandbox.daemon_version,
        "warmPoolId": sandbox.warm_pool_id,
        "sandboxClass": "container",
        "toolboxProxyUrl": toolbox_proxy_url,
        # The SDK requires createdAt, updatedAt and snapshotRef whenever buildInfo is present.
        "buildInfo": {
            "snapshotRef": sandbox.build_ref,
            "createdAt": iso(sandbox.created_at),
            "updatedAt": iso(sandbox.updated_at),
        }
        if sandbox.build_ref
        else None,
        "createdAt": iso(sandbox.created_at),
        "updatedAt": iso(sandbox.updated_at),
        "lastActivityAt": iso(sandbox.last_activity_at),
    }


def snapshot_dto(snapshot: Snapshot) -> dict[str, object]:
    return {
        "id": snapshot.id,
        "organizationId": snapshot.organization_id,
        "general": snapshot.general,
        "name": snapshot.name,
        "imageName": snapshot.image_name,
        "ref": snapshot.ref,
        "state": snapshot.state,
        "size": round(snapshot.size_bytes / 1024**3, 3) if snapshot.size_bytes else None,
        "entrypoint": snapshot.entrypoint,
        "cpu": snapshot.cpu,
        "gpu": 0,
        "mem": snapshot.memory,
        "disk": snapshot.disk,
        "errorReason": snapshot.error_reason,
        "createdAt": iso(snapshot.created_at),
        "updatedAt": iso(snapshot.updated_at),
        "lastUsedAt": iso(snapshot.last_used_at) if snapshot.last_used_at else None,
        "regionIds": [],
        "sourceSandboxId": None,
    }


class SandboxEventDto(WireModel):
    """One entry of `GET /sandbox/{id}/events` (an extension): `type`, `occurredAt`, and the event's own
    fields (`state`, `exitCode`, `signal`, `reason`, ... depending on the type)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    type: str
    occurred_at: str


class StorageAccessDto(WireModel):
    """`StorageAccessDto`: where and with what the SDK uploads build context (all fields required)."""

    access_key: str
    secret: str
    session_token: str
    storage_url: str
    organization_id: str
    bucket: str
    region: str


class HealthDto(BaseModel):
    status: str


class OidcDto(BaseModel):
    issuer: str
    clientId: str
    audience: str
    provider: str


class ConfigDto(WireModel):
    """`DaytonaConfiguration`: what the SDK and dashboards read from `GET /config`."""

    version: str
    oidc: OidcDto
    linked_accounts_enabled: bool
    announcements: dict[str, Any]
    proxy_template_url: str
    proxy_toolbox_url: str
    default_snapshot: str
    dashboard_url: str
    max_auto_archive_interval: int
    maintanance_mode: bool  # sic: Daytona's spelling
    environment: str


# The build-log routes stream plain text (documented as such rather than as JSON).
TEXT_PLAIN = {"content": {"text/plain": {"schema": {"type": "string"}}}}


class ListQuery(WireModel):
    cursor: str | None = None
    limit: int = Field(default=100, ge=1, le=200)


class MetricDataPointDto(WireModel):
    """`MetricDataPoint`: `timestamp` an ISO 8601 string (UTC), `value` a number in the metric's unit."""

    timestamp: str
    value: float


class MetricSeriesDto(WireModel):
    """`MetricSeries`: one metric (`daytona.sandbox.cpu.utilization`, ...) over time."""

    metric_name: str
    data_points: list[MetricDataPointDto]


class MetricsResponseDto(WireModel):
    """`MetricsResponse` of `GET /sandbox/{id}/telemetry/metrics` (wire contract §2.2)."""

    series: list[MetricSeriesDto]


class NetworkFlowDto(WireModel):
    """One entry of a sandbox's flow log (Tidepool's own: Daytona has no flow log). `time` ISO 8601 (UTC);
    `verdict` `allowed` or `denied`; `rule` what decided (`networkBlockAll`, `networkAllowList <cidr>`,
    `domainAllowList <domain>`, `dns`, `not in networkAllowList or domainAllowList`)."""

    time: str
    protocol: str
    source: str
    destination: str
    port: int | None = None
    verdict: str
    rule: str


class NetworkFlowsDto(WireModel):
    """`GET /sandbox/{id}/network/flows`: the newest flows, oldest first."""

    flows: list[NetworkFlowDto]


def warm_pool_dto(pool: WarmPool, current_size: int) -> dict[str, object]:
    return {
        "id": pool.id,
        "organizationId": pool.organization_id,
        "snapshot": pool.snapshot,
        "target": pool.target,
        "pool": pool.pool,
        "currentSize": current_size,
        "cpu": pool.cpu,
        "mem": pool.memory,
        "disk": pool.disk,
        "osUser": pool.os_user,
        "env": {},
        "errorReason": pool.error_reason,
        "createdAt": iso(pool.created_at),
        "updatedAt": iso(pool.updated_at),
    }


def webhook_endpoint_dto(endpoint: WebhookEndpoint) -> dict[str, object]:
    return {
        "id": endpoint.id,
        "organizationId": endpoint.organization_id,
        "url": endpoint.url,
        "description": endpoint.description,
        "eventTypes": list(endpoint.event_types),
        "enabled": endpoint.enabled,
        "createdAt": iso(endpoint.created_at),
        "updatedAt": iso(endpoint.updated_at),
    }


def webhook_attempt_dto(attempt: WebhookAttempt) -> dict[str, object]:
    return {
        "id": attempt.id,
        "messageId": attempt.message_id,
        "eventType": attempt.event_type,
        "attempt": attempt.attempt,
        "statusCode": attempt.status_code,
        "error": attempt.error,
        "durationMs": attempt.duration_ms,
        "attemptedAt": iso(attempt.attempted_at),
    }


def webhook_delivery_dto(delivery: WebhookDelivery) -> dict[str, object]:
    return {
        "id": delivery.id,
        "messageId": delivery.message_id,
        "eventType": delivery.event_type,
        "orderingKey": delivery.ordering_key,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "nextAttemptAt": iso(delivery.next_attempt_at),
        "createdAt": iso(delivery.created_at),
        "payload": delivery.payload,
    }
