"""Wire models of the Daytona-compatible API (camelCase on the wire, as SDK 0.226.1 sends and expects)."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tidepool_api.db import Sandbox, Snapshot
from tidepool_contracts.states import SandboxState


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class VolumeMount(WireModel):
    volume_id: str
    mount_path: str
    subpath: str | None = None


class BuildInfoRequest(WireModel):
    dockerfile_content: str
    context_hashes: list[str] | None = None


class CreateSandboxRequest(WireModel):
    name: str | None = None
    snapshot: str | None = None
    user: str | None = None
    env: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    public: bool | None = None
    target: str | None = None
    network_block_all: bool | None = None
    network_allow_list: str | None = None
    cpu: int | None = None
    gpu: int | None = None
    memory: int | None = None
    disk: int | None = None
    auto_stop_interval: int | None = None
    auto_archive_interval: int | None = None
    auto_delete_interval: int | None = None
    volumes: list[VolumeMount] | None = None
    build_info: BuildInfoRequest | None = None


class ReplaceLabelsRequest(WireModel):
    labels: dict[str, str]


def iso(moment: datetime) -> str:
    # SQLite hands back naive datetimes; every stored time is UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        "volumes": [],
        "runnerId": sandbox.runner_id,
        "daemonVersion": sandbox.daemon_version,
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
    }


class ListQuery(WireModel):
    cursor: str | None = None
    limit: int = Field(default=100, ge=1, le=200)
