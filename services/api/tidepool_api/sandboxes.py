"""Sandbox use cases: validate, write desired state (checked against the state machine), publish intents."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from opentelemetry import trace
from sqlalchemy import and_, or_, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tidepool_api import previews, quotas, ssh_access, warm_pools, webhooks
from tidepool_api.context import ApiContext
from tidepool_api.db import Organization, Sandbox, Snapshot
from tidepool_api.errors import ApiError, bad_request, conflict, not_found
from tidepool_api.live_events import record_created, record_state_change
from tidepool_api.schemas import (
    CreateSandboxRequest,
    ResizeSandboxRequest,
    UpdateSandboxNetworkSettingsRequest,
    split_list,
)
from tidepool_api.snapshots import ensure_build
from tidepool_api.volumes import mount_specs, resolve_mounts
from tidepool_contracts import channels
from tidepool_contracts.models import (
    DesiredSandbox,
    SandboxAction,
    SandboxIntent,
    SandboxSpec,
    SnapshotState,
    SnapshotTarget,
)
from tidepool_contracts.states import DesiredState, InvalidTransitionError, SandboxState, assert_transition
from tidepool_runtime.broker import kv_get, kv_put

log = structlog.get_logger("tidepool.api.sandboxes")
tracer = trace.get_tracer("tidepool.api")

LANGUAGE_LABEL = "code-toolbox-language"
SUPPORTED_LANGUAGES = {"python", "typescript", "javascript"}
DEFAULT_AUTO_STOP = 15
DEFAULT_AUTO_ARCHIVE = 10080
MAX_AUTO_ARCHIVE = 43200
SETTLED_AFTER_CREATE = {SandboxState.STARTED, SandboxState.ERROR, SandboxState.BUILD_FAILED}


def utc_now() -> datetime:
    return datetime.now(UTC)


async def find_sandbox(session: AsyncSession, organization_id: str, id_or_name: str) -> Sandbox:
    statement = select(Sandbox).where(
        Sandbox.organization_id == organization_id,
        or_(Sandbox.id == id_or_name, Sandbox.name == id_or_name),
        Sandbox.state != SandboxState.DESTROYED,
    )
    sandbox = (await session.exec(statement)).first()
    if sandbox is None:
        raise not_found(f"Sandbox with ID or name {id_or_name} not found")
    return sandbox


async def transition(
    session: AsyncSession,
    sandbox: Sandbox,
    target: SandboxState,
    *,
    cause: str | None = None,
    **changes: object,
) -> bool:
    """The one write path for a sandbox's state: checked against the transition table, compare-and-set.
    `cause`: why the platform made the change on its own (live events carry it), None for a user's."""
    current = SandboxState(sandbox.state)
    assert_transition(current, target)
    values: dict[str, object] = {"state": target.value, "updated_at": utc_now(), **changes}
    if current != target:
        values["last_activity_at"] = values["updated_at"]
    result = await session.exec(  # type: ignore[call-overload]
        update(Sandbox)
        .where(and_(col(Sandbox.id) == sandbox.id, col(Sandbox.state) == current.value))
        .values(**values)
    )
    if result.rowcount != 1:
        return False
    for key, value in values.items():
        setattr(sandbox, key, value)
    record_state_change(session, sandbox, current.value, target.value, cause)
    webhooks.record_sandbox_state(session, sandbox, current.value, target.value)
    return True


# Image commands that only start an interactive shell or REPL: nothing to run next to the toolbox.
INTERACTIVE_COMMANDS = {"bash", "sh", "/bin/bash", "/bin/sh", "python", "python3", "node", "/bin/zsh", "zsh"}


def service_entrypoint(entrypoint: list[str] | None) -> list[str] | None:
    """The snapshot's entrypoint if it starts a service (e.g. a web server), not just a shell."""
    if not entrypoint or (len(entrypoint) == 1 and entrypoint[0] in INTERACTIVE_COMMANDS):
        return None
    return entrypoint


def spec_of(sandbox: Sandbox) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=sandbox.id,
        organization_id=sandbox.organization_id,
        image=sandbox.image,
        snapshot=sandbox.snapshot,
        os_user=sandbox.os_user,
        cpu=sandbox.cpu,
        memory_gib=sandbox.memory,
        disk_gib=sandbox.disk,
        env=sandbox.env,
        labels=sandbox.labels,
        network_block_all=sandbox.network_block_all,
        network_allow_list=[] if sandbox.network_block_all else split_list(sandbox.network_allow_list),
        domain_allow_list=[] if sandbox.network_block_all else split_list(sandbox.domain_allow_list),
        entrypoint=sandbox.entrypoint,
        volumes=mount_specs(sandbox.volumes or []),
        claimed=sandbox.claimed,
    )


async def announce(
    context: ApiContext, sandbox: Sandbox, action: SandboxAction, desired: DesiredState, force: bool = False
) -> None:
    """Record the desired state for the reconciler, then publish the intent (dedup by intent id)."""
    with tracer.start_as_current_span(f"sandbox.{action.value}", attributes={"sandbox.id": sandbox.id}):
        await _announce(context, sandbox, action, desired, force)


async def _announce(
    context: ApiContext, sandbox: Sandbox, action: SandboxAction, desired: DesiredState, force: bool
) -> None:
    spec = spec_of(sandbox)
    intent = SandboxIntent(
        sandbox_id=sandbox.id, organization_id=sandbox.organization_id, action=action, spec=spec, force=force
    )
    await kv_put(
        context.desired_kv,
        sandbox.id,
        DesiredSandbox(
            sandbox_id=sandbox.id,
            organization_id=sandbox.organization_id,
            desired_state=desired,
            spec=spec,
            force=force,
            intent_id=intent.intent_id,
            auto_stop_interval=sandbox.auto_stop_interval,
            auto_delete_interval=sandbox.auto_delete_interval,
            auto_archive_interval=sandbox.auto_archive_interval,
        ),
    )
    if action == SandboxAction.DESTROY:
        await previews.forget_access(context, sandbox.id)
        async with context.database.sessions() as session:  # its SSH tokens open nothing any more
            await ssh_access.revoke(context, session, sandbox.id, None)
    else:
        await previews.publish_access(context, sandbox)
    await context.bus.publish(
        channels.SANDBOX_INTENTS, intent, msg_id=intent.intent_id, sandbox_id=sandbox.id
    )


async def refresh_desired(context: ApiContext, sandbox: Sandbox) -> None:
    """Update the desired record's spec and lifecycle intervals without a new intent (nothing to do on a
    runner until the next one): the intent id is kept, so the reconciler re-sends nothing. A change is
    activity, so `updated_at` moves."""
    current = await kv_get(context.desired_kv, sandbox.id, DesiredSandbox)
    if current is None:
        return
    update = {
        "spec": spec_of(sandbox),
        "auto_stop_interval": sandbox.auto_stop_interval,
        "auto_delete_interval": sandbox.auto_delete_interval,
        "auto_archive_interval": sandbox.auto_archive_interval,
        "updated_at": utc_now(),
    }
    await kv_put(context.desired_kv, sandbox.id, current.model_copy(update=update))


def validate_resources(request: CreateSandboxRequest, organization: Organization) -> None:
    for name, value in (("cpu", request.cpu), ("memory", request.memory), ("disk", request.disk)):
        if value is not None and value < 1:
            raise bad_request(f"{name} must be at least 1, got {value}")
    # Checked again on the final values (a snapshot's) at admission; this refuses before any build.
    quotas.check_per_sandbox(organization, request.cpu or 0, request.memory or 0, request.disk or 0)
    if request.gpu:
        raise bad_request("GPU sandboxes are not available on this installation")
    for name in ("auto_stop_interval", "auto_archive_interval"):
        value = getattr(request, name)
        if value is not None and value < 0:
            raise bad_request(f"{name.replace('_', ' ')} must be non-negative")
    language = (request.labels or {}).get(LANGUAGE_LABEL)
    if language is not None and language not in SUPPORTED_LANGUAGES:
        raise bad_request(f"label {LANGUAGE_LABEL} must be one of python, typescript, javascript")
    if request.build_info is not None and not request.build_info.dockerfile_content.strip():
        raise bad_request("buildInfo.dockerfileContent is empty")


async def resolve_snapshot(session: AsyncSession, organization_id: str, name: str) -> Snapshot:
    statement = select(Snapshot).where(
        or_(Snapshot.name == name, Snapshot.id == name),
        or_(Snapshot.organization_id == organization_id, col(Snapshot.general).is_(True)),
        col(Snapshot.hidden).is_(False),
    )
    snapshot = (await session.exec(statement)).first()
    if snapshot is None:
        raise bad_request(f"Snapshot {name} not found")
    if snapshot.state != "active":
        raise bad_request(f"Snapshot {name} is not active (state: {snapshot.state})")
    return snapshot


async def create_sandbox(context: ApiContext, organization_id: str, request: CreateSandboxRequest) -> Sandbox:
    async with context.database.sessions() as session:
        organization = await session.get(Organization, organization_id)
        if organization is None or organization.deleted_at is not None:
            raise ApiError(401, "organization of this API key no longer exists")
        validate_resources(request, organization)
        # Checked before anything is written: a refused mount leaves no sandbox behind.
        mounts = await resolve_mounts(session, organization_id, list(request.volumes or []))
        build: Snapshot | None = None
        if request.build_info is not None:
            if request.snapshot:
                raise bad_request("Give either a snapshot or buildInfo, not both")
            build = await ensure_build(
                context,
                session,
                organization_id,
                request.build_info.dockerfile_content,
                list(request.build_info.context_hashes or []),
            )
            snapshot = build
        else:
            snapshot = await resolve_snapshot(
                session, organization_id, request.snapshot or context.settings.default_snapshot
            )
        sandbox_id = str(uuid.uuid4())
        name = request.name or sandbox_id
        if request.name is not None:
            taken = await session.exec(
                select(Sandbox.id).where(
                    Sandbox.organization_id == organization_id,
                    Sandbox.name == name,
                    Sandbox.state != SandboxState.DESTROYED,
                )
            )
            if taken.first() is not None:
                raise conflict(f"Sandbox with name {name} already exists")
        labels = dict(request.labels or {})
        auto_archive = request.auto_archive_interval
        if auto_archive is not None:
            auto_archive = MAX_AUTO_ARCHIVE if auto_archive == 0 else min(auto_archive, MAX_AUTO_ARCHIVE)
        auto_stop = DEFAULT_AUTO_STOP if request.auto_stop_interval is None else request.auto_stop_interval
        auto_delete = -1 if request.auto_delete_interval is None else request.auto_delete_interval
        auto_archive = DEFAULT_AUTO_ARCHIVE if auto_archive is None else auto_archive
        if build is None:
            # A claimed sandbox counts against the quota as a cold create would: admitted under the same lock.
            async with quotas.organization_lock(session, organization_id) as locked:
                quotas.check_per_sandbox(locked, snapshot.cpu, snapshot.memory, snapshot.disk)
                claimed = await warm_pools.claim(
                    context,
                    session,
                    organization_id,
                    request,
                    snapshot,
                    {
                        # Without a name the sandbox is named by its id, as a cold create names it.
                        "name": request.name if request.name is not None else col(Sandbox.id),
                        "labels": labels,
                        "env": dict(request.env or {}),
                        "public": bool(request.public),
                        "auto_stop_interval": auto_stop,
                        "auto_archive_interval": auto_archive,
                        "auto_delete_interval": auto_delete,
                    },
                )
                if claimed is not None:
                    wanted = quotas.demand(claimed.cpu, claimed.memory, claimed.disk, SandboxState.STARTED)
                    try:
                        settings, none = context.settings, quotas.Resources()
                        await quotas.admit(session, settings, locked, none, wanted, exclude_id=claimed.id)
                    except ApiError:
                        await session.rollback()  # the member goes back to the pool
                        raise
                    await session.commit()
            if claimed is not None:
                return await _finish_claim(context, claimed)
        waits_for_build = build is not None and build.state != SnapshotState.ACTIVE.value
        initial_state = SandboxState.PENDING_BUILD if waits_for_build else SandboxState.CREATING
        assert_transition(SandboxState.UNKNOWN, initial_state)
        sandbox = Sandbox(
            id=sandbox_id,
            organization_id=organization_id,
            name=name,
            state=initial_state.value,
            desired_state=DesiredState.STARTED.value,
            snapshot=None if build is not None else snapshot.name,
            image=snapshot.registry_ref or snapshot.ref or snapshot.image_name,
            build_ref=build.ref if build is not None else None,
            entrypoint=service_entrypoint(snapshot.entrypoint),
            os_user=request.user or "daytona",
            env=dict(request.env or {}),
            labels=labels,
            cpu=request.cpu or (1 if build is not None else snapshot.cpu),
            memory=request.memory or (1 if build is not None else snapshot.memory),
            disk=request.disk or (3 if build is not None else snapshot.disk),
            public=bool(request.public),
            preview_token=previews.new_preview_token(),
            network_block_all=bool(request.network_block_all),
            # networkBlockAll wins over the lists, which are then ignored (behaviour spec §5).
            network_allow_list=None if request.network_block_all else request.network_allow_list or None,
            domain_allow_list=None if request.network_block_all else request.domain_allow_list or None,
            target=request.target or context.settings.runner_region,
            auto_stop_interval=auto_stop,
            auto_archive_interval=auto_archive,
            auto_delete_interval=auto_delete,
            volumes=mounts,
        )
        async with quotas.organization_lock(session, organization_id) as locked:
            # Check, insert and commit under the organization's lock: a burst cannot overshoot.
            await admit_new(context, session, locked, sandbox)
            session.add(sandbox)
            record_created(session, sandbox)
            webhooks.record_sandbox_created(session, sandbox)
            await session.commit()
    if sandbox.state == SandboxState.PENDING_BUILD:
        # The create intent follows when the builder reports the image ready (see events.py); the image may
        # have become ready while this row was being written, so check once more now.
        await release_built_sandbox(context, sandbox.id)
        async with context.database.sessions() as session:
            return await session.get(Sandbox, sandbox.id) or sandbox
    try:
        await announce(context, sandbox, SandboxAction.CREATE, DesiredState.STARTED)
    except Exception as error:
        # Nothing half-created: without the intent nobody would ever build this sandbox.
        log.error("sandbox.intent_failed", sandbox_id=sandbox.id, error=str(error))
        async with context.database.sessions() as session:
            row = await session.get(Sandbox, sandbox.id)
            if row is not None:
                await session.delete(row)
                await session.commit()
        raise ApiError(503, "the platform bus is unavailable; sandbox not created") from error
    return await wait_for_state(
        context, sandbox.id, SETTLED_AFTER_CREATE, context.settings.create_wait_seconds
    )


async def _finish_claim(context: ApiContext, sandbox: Sandbox) -> Sandbox:
    """After a warm-pool claim is committed: the desired record, preview access and the runner (route, the
    daemon's env) follow the new owner; answer once the runner has reported it (its daemon version is set
    again) or the sandbox failed, as a cold create waits for `started`."""
    try:
        await announce(context, sandbox, SandboxAction.CLAIM, DesiredState.STARTED)
    except Exception as error:
        log.error("sandbox.claim_intent_failed", sandbox_id=sandbox.id, error=str(error))
        raise ApiError(503, "the platform bus is unavailable; retry") from error
    return await wait_for_state(
        context,
        sandbox.id,
        SETTLED_AFTER_CREATE - {SandboxState.STARTED},
        context.settings.create_wait_seconds,
        until=lambda row: row.state == SandboxState.STARTED and row.daemon_version is not None,
    )


async def admit_new(
    context: ApiContext, session: AsyncSession, organization: Organization, sandbox: Sandbox
) -> None:
    """Quota admission of a sandbox about to be inserted (under `quotas.organization_lock`)."""
    quotas.check_per_sandbox(organization, sandbox.cpu, sandbox.memory, sandbox.disk)
    wanted = quotas.demand(sandbox.cpu, sandbox.memory, sandbox.disk, SandboxState(sandbox.state))
    await quotas.admit(session, context.settings, organization, quotas.Resources(), wanted)


async def wait_for_state(
    context: ApiContext,
    sandbox_id: str,
    states: set[SandboxState],
    wait_seconds: float,
    until: Callable[[Sandbox], bool] | None = None,
) -> Sandbox:
    """Wait until the sandbox reaches one of `states` or satisfies `until` (or the timeout), then return it
    as stored."""
    wake = context.waiters.register(sandbox_id)
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            async with context.database.sessions() as session:
                sandbox = await session.get(Sandbox, sandbox_id)
            if sandbox is None:
                raise not_found(f"Sandbox with ID or name {sandbox_id} not found")
            remaining = deadline - time.monotonic()
            if (
                SandboxState(sandbox.state) in states
                or remaining <= 0
                or (until is not None and until(sandbox))
            ):
                return sandbox
            wake.clear()
            # The poll interval covers wake-ups published by another API replica.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=min(remaining, 0.25))
    finally:
        context.waiters.unregister(sandbox_id, wake)


async def admit_change(
    context: ApiContext,
    session: AsyncSession,
    organization: Organization,
    sandbox: Sandbox,
    next_state: SandboxState,
    resources: tuple[int, int, int] | None = None,
) -> None:
    """Quota admission of a sandbox going to `next_state` (with new `resources` (cpu, memory, disk) for a
    resize), under `quotas.organization_lock`."""
    cpu, memory, disk = resources or (sandbox.cpu, sandbox.memory, sandbox.disk)
    before = quotas.demand(sandbox.cpu, sandbox.memory, sandbox.disk, SandboxState(sandbox.state))
    after = quotas.demand(cpu, memory, disk, next_state)
    await quotas.admit(session, context.settings, organization, before, after, exclude_id=sandbox.id)


async def change_state(
    context: ApiContext,
    organization_id: str,
    id_or_name: str,
    *,
    allowed_from: set[SandboxState],
    already: set[SandboxState],
    target: SandboxState,
    action: SandboxAction,
    desired: DesiredState,
    verb: str,
    force: bool = False,
    target_from: dict[SandboxState, SandboxState] | None = None,
    keep_forks_alive: bool = True,
) -> Sandbox:
    """`target_from`: a different transitional state from some states (archived → restoring).
    `keep_forks_alive`: a DESTROY of a parent with live forks is refused (409)."""
    async with (
        context.database.sessions() as session,
        # A start uses quota again (cpu and memory; disk too from an archive): admitted under the lock.
        quotas.organization_lock(session, organization_id)
        if action == SandboxAction.START
        else contextlib.nullcontext() as locked,
    ):
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        current = SandboxState(sandbox.state)
        if current in already and sandbox.desired_state == desired.value:
            return sandbox
        if current not in allowed_from:
            raise bad_request(f"Sandbox {sandbox.id} cannot be {verb} in state '{current}'")
        if action == SandboxAction.DESTROY and keep_forks_alive:
            await refuse_parent_of_live_forks(session, sandbox)
        next_state = (target_from or {}).get(current, target)
        if locked is not None:
            await admit_change(context, session, locked, sandbox, next_state)
        # A start hands out a new preview token: links given out before it open nothing any more.
        rotated = {"preview_token": previews.new_preview_token()} if action == SandboxAction.START else {}
        try:
            changed = await transition(
                session,
                sandbox,
                next_state,
                desired_state=desired.value,
                error_reason=None,
                **rotated,
            )
        except InvalidTransitionError as error:
            raise bad_request(str(error)) from error
        if not changed:
            raise conflict(f"Sandbox {sandbox.id} changed state concurrently; retry")
        await session.commit()
    await announce(context, sandbox, action, desired, force=force)
    return sandbox


async def start_sandbox(context: ApiContext, organization_id: str, id_or_name: str) -> Sandbox:
    return await change_state(
        context,
        organization_id,
        id_or_name,
        allowed_from={SandboxState.STOPPED, SandboxState.ERROR, SandboxState.ARCHIVED},
        already={SandboxState.STARTED, SandboxState.STARTING, SandboxState.RESTORING},
        target=SandboxState.STARTING,
        action=SandboxAction.START,
        desired=DesiredState.STARTED,
        verb="started",
        # From an archive: the container is recreated from the archived image on any runner.
        target_from={SandboxState.ARCHIVED: SandboxState.RESTORING},
    )


async def archive_sandbox(context: ApiContext, organization_id: str, id_or_name: str) -> Sandbox:
    """`POST /sandbox/{id}/archive` (behaviour spec "Archive"): only a stopped sandbox (400 otherwise, as
    Daytona); `archiving` → `archived` once its filesystem is committed and pushed and its runner freed."""
    async with context.database.sessions() as session:
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        current = SandboxState(sandbox.state)
        if current in (SandboxState.ARCHIVING, SandboxState.ARCHIVED):
            return sandbox
        if current != SandboxState.STOPPED:
            raise bad_request(
                f"Sandbox {sandbox.id} is not stopped (state '{current}'): stop it to archive it"
            )
        changed = await transition(
            session, sandbox, SandboxState.ARCHIVING, desired_state=DesiredState.ARCHIVED.value
        )
        if not changed:
            raise conflict(f"Sandbox {sandbox.id} changed state concurrently; retry")
        await session.commit()
    await announce(context, sandbox, SandboxAction.ARCHIVE, DesiredState.ARCHIVED)
    return sandbox


LIVE_FORK_EXCLUDED = (SandboxState.DESTROYED.value, SandboxState.DESTROYING.value)


async def live_forks(session: AsyncSession, sandbox: Sandbox) -> list[Sandbox]:
    """The sandbox's forks that are neither deleted nor being deleted, oldest first."""
    forks = await session.exec(
        select(Sandbox)
        .where(Sandbox.parent_id == sandbox.id, col(Sandbox.state).not_in(LIVE_FORK_EXCLUDED))
        .order_by(col(Sandbox.created_at))
    )
    return list(forks.all())


async def refuse_parent_of_live_forks(session: AsyncSession, sandbox: Sandbox) -> None:
    """Behaviour spec "Fork": a parent cannot be deleted while it has forks that are not deleted (409)."""
    live = [fork.id for fork in await live_forks(session, sandbox)]
    if live:
        raise conflict(
            f"Sandbox {sandbox.id} has {len(live)} fork(s) that are not deleted ({', '.join(live[:5])}): "
            "delete them first"
        )


SNAPSHOTTABLE = {SandboxState.STARTED, SandboxState.STOPPED}


def _snapshot_image_ref(organization_id: str, snapshot_id: str) -> str:
    return f"localhost/tidepool/snapshot/{organization_id}:{snapshot_id}"


async def _request_commit(context: ApiContext, sandbox: Sandbox, snapshot: Snapshot) -> None:
    """Ask the sandbox's runner to commit its filesystem into `snapshot` (a one-off SNAPSHOT intent)."""
    assert snapshot.ref is not None
    intent = SandboxIntent(
        sandbox_id=sandbox.id,
        organization_id=sandbox.organization_id,
        action=SandboxAction.SNAPSHOT,
        spec=spec_of(sandbox),
        snapshot=SnapshotTarget(snapshot_id=snapshot.id, snapshot_name=snapshot.name, image_ref=snapshot.ref),
    )
    await context.bus.publish(
        channels.SANDBOX_INTENTS, intent, msg_id=intent.intent_id, sandbox_id=sandbox.id
    )


def _snapshot_row(sandbox: Sandbox, name: str, *, hidden: bool) -> Snapshot:
    snapshot_id = str(uuid.uuid4())
    ref = _snapshot_image_ref(sandbox.organization_id, snapshot_id)
    return Snapshot(
        id=snapshot_id,
        organization_id=sandbox.organization_id,
        name=name,
        image_name=ref,
        ref=ref,
        hidden=hidden,
        entrypoint=sandbox.entrypoint,
        state=SnapshotState.PENDING.value,
        cpu=sandbox.cpu,
        memory=sandbox.memory,
        disk=sandbox.disk,
    )


async def snapshot_sandbox(context: ApiContext, organization_id: str, id_or_name: str, name: str) -> Snapshot:
    """`POST /sandbox/{id}/snapshot`: a snapshot of the sandbox's filesystem (started or stopped), usable by
    `create(snapshot=name)` once `active`. The sandbox's own state does not change."""
    if not name.strip():
        raise bad_request("snapshot name is required")
    async with context.database.sessions() as session:
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        current = SandboxState(sandbox.state)
        if current not in SNAPSHOTTABLE:
            raise bad_request(f"Sandbox {sandbox.id} cannot be snapshotted in state '{current}'")
        taken = await session.exec(
            select(Snapshot.id).where(Snapshot.organization_id == organization_id, Snapshot.name == name)
        )
        if taken.first() is not None:
            raise conflict(f"Snapshot with name {name} already exists")
        snapshot = _snapshot_row(sandbox, name, hidden=False)
        async with quotas.organization_lock(session, organization_id) as locked:
            await quotas.check_snapshot_count(session, context.settings, locked)
            session.add(snapshot)
            await session.commit()
    await _request_commit(context, sandbox, snapshot)
    return snapshot


async def wait_for_snapshot(context: ApiContext, snapshot_id: str, wait_seconds: float) -> Snapshot:
    deadline = time.monotonic() + wait_seconds
    while True:
        async with context.database.sessions() as session:
            snapshot = await session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise not_found(f"Snapshot {snapshot_id} not found")
        if snapshot.state != SnapshotState.PENDING.value or time.monotonic() >= deadline:
            return snapshot
        await asyncio.sleep(0.2)


async def fork_sandbox(
    context: ApiContext, organization_id: str, id_or_name: str, name: str | None
) -> Sandbox:
    """`POST /sandbox/{id}/fork`: a new, independent sandbox with a copy of the parent's filesystem (its
    env, labels, resources and user too), linked to it by `parent_id`. The parent's filesystem is committed
    to a hidden snapshot; the child waits for it in `pending_build` and is created from it."""
    async with context.database.sessions() as session:
        parent = await find_sandbox(session, organization_id, id_or_name)
        current = SandboxState(parent.state)
        if current not in SNAPSHOTTABLE:
            raise bad_request(f"Sandbox {parent.id} cannot be forked in state '{current}'")
        child_id = str(uuid.uuid4())
        child_name = name or child_id
        if name is not None:
            taken = await session.exec(
                select(Sandbox.id).where(
                    Sandbox.organization_id == organization_id,
                    Sandbox.name == name,
                    Sandbox.state != SandboxState.DESTROYED,
                )
            )
            if taken.first() is not None:
                raise conflict(f"Sandbox with name {name} already exists")
        snapshot = _snapshot_row(parent, f"fork-{child_id}", hidden=True)
        snapshot.last_used_at = utc_now()
        session.add(snapshot)
        assert_transition(SandboxState.UNKNOWN, SandboxState.PENDING_BUILD)
        child = Sandbox(
            id=child_id,
            organization_id=organization_id,
            name=child_name,
            state=SandboxState.PENDING_BUILD.value,
            desired_state=DesiredState.STARTED.value,
            snapshot=parent.snapshot,
            image=snapshot.ref or parent.image,
            build_ref=snapshot.ref,
            entrypoint=parent.entrypoint,
            os_user=parent.os_user,
            env=dict(parent.env),
            labels=dict(parent.labels),
            # The same volumes, mounted (not copied): a volume outlives and is shared by every sandbox.
            volumes=[dict(mount) for mount in parent.volumes or []],
            cpu=parent.cpu,
            memory=parent.memory,
            disk=parent.disk,
            public=parent.public,
            network_block_all=parent.network_block_all,
            network_allow_list=parent.network_allow_list,
            domain_allow_list=parent.domain_allow_list,
            target=parent.target,
            auto_stop_interval=parent.auto_stop_interval,
            auto_archive_interval=parent.auto_archive_interval,
            auto_delete_interval=parent.auto_delete_interval,
            parent_id=parent.id,
        )
        async with quotas.organization_lock(session, organization_id) as locked:
            await admit_new(context, session, locked, child)
            session.add(child)
            record_created(session, child)
            webhooks.record_sandbox_created(session, child)
            await session.commit()
    await _request_commit(context, parent, snapshot)
    return await wait_for_state(context, child.id, SETTLED_AFTER_CREATE, context.settings.create_wait_seconds)


async def stop_sandbox(context: ApiContext, organization_id: str, id_or_name: str, force: bool) -> Sandbox:
    return await change_state(
        context,
        organization_id,
        id_or_name,
        allowed_from={SandboxState.STARTED, SandboxState.ERROR},
        already={SandboxState.STOPPED, SandboxState.STOPPING},
        target=SandboxState.STOPPING,
        action=SandboxAction.STOP,
        desired=DesiredState.STOPPED,
        verb="stopped",
        force=force,
    )


async def delete_sandbox(
    context: ApiContext, organization_id: str, id_or_name: str, *, with_forks_alive: bool = False
) -> Sandbox:
    """`with_forks_alive`: delete even a parent whose forks live (the whole organization goes)."""
    deletable = set(SandboxState) - {SandboxState.DESTROYED, SandboxState.DESTROYING}
    sandbox = await change_state(
        context,
        organization_id,
        id_or_name,
        allowed_from=deletable,
        already={SandboxState.DESTROYING},
        target=SandboxState.DESTROYING,
        action=SandboxAction.DESTROY,
        desired=DesiredState.DESTROYED,
        verb="deleted",
        force=True,
        keep_forks_alive=not with_forks_alive,
    )
    return sandbox


async def recover_sandbox(context: ApiContext, organization_id: str, id_or_name: str) -> Sandbox:
    """`POST /sandbox/{id}/recover` (behaviour spec "Recover"): only from `error` with `recoverable` true
    (400 otherwise; never automatic): the sandbox's container restarts, `error` → `starting` → `started`."""
    async with (
        context.database.sessions() as session,
        quotas.organization_lock(session, organization_id) as locked,
    ):
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        current = SandboxState(sandbox.state)
        if current != SandboxState.ERROR or not sandbox.recoverable:
            what = "its error is not recoverable" if current == SandboxState.ERROR else f"it is '{current}'"
            raise bad_request(f"Sandbox {sandbox.id} cannot be recovered: {what}")
        await admit_change(context, session, locked, sandbox, SandboxState.STARTING)
        changed = await transition(
            session,
            sandbox,
            SandboxState.STARTING,
            desired_state=DesiredState.STARTED.value,
            error_reason=None,
            recoverable=False,
            preview_token=previews.new_preview_token(),
        )
        if not changed:
            raise conflict(f"Sandbox {sandbox.id} changed state concurrently; retry")
        await session.commit()
    await announce(context, sandbox, SandboxAction.RECOVER, DesiredState.STARTED)
    return sandbox


async def resize_sandbox(
    context: ApiContext, organization_id: str, id_or_name: str, request: ResizeSandboxRequest
) -> Sandbox:
    """`POST /sandbox/{id}/resize` (behaviour spec "Resize"): a started sandbox may only grow cpu and memory
    (applied live: `resizing` → `started`); a stopped one may change cpu and memory either way and grow its
    disk (applied at its next start). Everything else is a 400 naming the rule; nothing changes then."""
    if request.cpu is None and request.memory is None and request.disk is None:
        raise bad_request("resize needs at least one of cpu, memory or disk")
    async with (
        context.database.sessions() as session,
        quotas.organization_lock(session, organization_id) as organization,
    ):
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        wanted = {
            "cpu": sandbox.cpu if request.cpu is None else request.cpu,
            "memory": sandbox.memory if request.memory is None else request.memory,
            "disk": sandbox.disk if request.disk is None else request.disk,
        }
        quotas.check_per_sandbox(organization, wanted["cpu"], wanted["memory"], wanted["disk"], 400)
        if wanted["disk"] < sandbox.disk:
            raise bad_request(f"disk can only grow: it is {sandbox.disk} GiB, asked {wanted['disk']} GiB")
        current = SandboxState(sandbox.state)
        if current == SandboxState.STARTED:
            if wanted["disk"] != sandbox.disk:
                raise bad_request("disk can be resized only while the sandbox is stopped")
            shrinking = [name for name in ("cpu", "memory") if wanted[name] < getattr(sandbox, name)]
            if shrinking:
                raise bad_request(
                    f"a started sandbox can only grow cpu and memory ({', '.join(shrinking)} would shrink): "
                    "stop it first"
                )
        elif current != SandboxState.STOPPED:
            raise bad_request(f"Sandbox {sandbox.id} cannot be resized in state '{current}'")
        if all(wanted[name] == getattr(sandbox, name) for name in wanted):
            return sandbox
        next_state = SandboxState.RESIZING if current == SandboxState.STARTED else current
        resources = (wanted["cpu"], wanted["memory"], wanted["disk"])
        await admit_change(context, session, organization, sandbox, next_state, resources)
        sandbox.cpu, sandbox.memory, sandbox.disk = wanted["cpu"], wanted["memory"], wanted["disk"]
        sandbox.updated_at = utc_now()
        session.add(sandbox)
        if current == SandboxState.STARTED and not await transition(session, sandbox, SandboxState.RESIZING):
            raise conflict(f"Sandbox {sandbox.id} changed state concurrently; retry")
        await session.commit()
    if current == SandboxState.STARTED:
        await announce(context, sandbox, SandboxAction.RESIZE, DesiredState.STARTED)
    else:
        # The next START carries the new resources; the reconciler's copy must have them too.
        await refresh_desired(context, sandbox)
    return sandbox


async def update_network_settings(
    context: ApiContext, organization_id: str, id_or_name: str, request: UpdateSandboxNetworkSettingsRequest
) -> Sandbox:
    """`POST /sandbox/{id}/network-settings` (behaviour spec §5): stores the egress policy and, on a running
    sandbox, has its runner apply it at once (no restart); a stopped one gets it at its next start.
    `networkBlockAll: true` blocks all egress and clears the lists; `false` alone restores the default
    policy and clears them; a list (`""` clears it) implies block-all off. 400 when no field is given."""
    fields = request.model_fields_set
    if not fields & {"network_block_all", "network_allow_list", "domain_allow_list"} or (
        request.network_block_all is None
        and request.network_allow_list is None
        and request.domain_allow_list is None
    ):
        raise bad_request("at least one of networkBlockAll, networkAllowList or domainAllowList must be set")
    async with context.database.sessions() as session:
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        if request.network_block_all is True:
            sandbox.network_block_all = True
            sandbox.network_allow_list = sandbox.domain_allow_list = None
        elif request.network_allow_list is None and request.domain_allow_list is None:
            sandbox.network_block_all = False
            sandbox.network_allow_list = sandbox.domain_allow_list = None
        else:
            sandbox.network_block_all = False
            if request.network_allow_list is not None:
                sandbox.network_allow_list = request.network_allow_list or None
            if request.domain_allow_list is not None:
                sandbox.domain_allow_list = request.domain_allow_list or None
        sandbox.updated_at = utc_now()
        session.add(sandbox)
        await session.commit()
    await refresh_desired(context, sandbox)
    if sandbox.state in (SandboxState.STARTED, SandboxState.STARTING, SandboxState.RESIZING):
        intent = SandboxIntent(
            sandbox_id=sandbox.id,
            organization_id=sandbox.organization_id,
            action=SandboxAction.NETWORK,
            spec=spec_of(sandbox),
        )
        await context.bus.publish(
            channels.SANDBOX_INTENTS, intent, msg_id=intent.intent_id, sandbox_id=sandbox.id
        )
    return sandbox


async def replace_labels(
    context: ApiContext, organization_id: str, id_or_name: str, labels: dict[str, str]
) -> dict[str, str]:
    language = labels.get(LANGUAGE_LABEL)
    if language is not None and language not in SUPPORTED_LANGUAGES:
        raise bad_request(f"label {LANGUAGE_LABEL} must be one of python, typescript, javascript")
    async with context.database.sessions() as session:
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        sandbox.labels = dict(labels)
        sandbox.updated_at = utc_now()
        session.add(sandbox)
        await session.commit()
    return labels


async def set_interval(
    context: ApiContext, organization_id: str, id_or_name: str, field_name: str, minutes: int
) -> Sandbox:
    if field_name == "auto_delete_interval":
        if minutes < -1:
            raise bad_request("auto-delete interval must be -1 (disabled) or non-negative")
    elif minutes < 0:
        raise bad_request(f"{field_name.replace('_', ' ')} must be non-negative")
    if field_name == "auto_archive_interval":
        minutes = MAX_AUTO_ARCHIVE if minutes == 0 else min(minutes, MAX_AUTO_ARCHIVE)
    async with context.database.sessions() as session:
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        setattr(sandbox, field_name, minutes)
        sandbox.updated_at = utc_now()
        session.add(sandbox)
        await session.commit()
    await refresh_desired(context, sandbox)  # the scheduler's timers read the intervals from there
    return sandbox


def encode_cursor(sandbox: Sandbox) -> str:
    raw = f"{sandbox.created_at.isoformat()}|{sandbox.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, sandbox_id = raw.split("|", 1)
        return datetime.fromisoformat(created), sandbox_id
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request("invalid cursor") from error


async def list_sandboxes(
    context: ApiContext,
    organization_ids: list[str],
    *,
    cursor: str | None,
    limit: int,
    labels: dict[str, str] | None,
    states: list[str] | None,
    name_prefix: str | None,
    id_prefix: str | None,
) -> tuple[list[Sandbox], str | None]:
    statement = select(Sandbox).where(
        col(Sandbox.organization_id).in_(organization_ids), Sandbox.state != SandboxState.DESTROYED
    )
    if states:
        statement = statement.where(col(Sandbox.state).in_(states))
    if name_prefix:
        statement = statement.where(col(Sandbox.name).startswith(name_prefix))
    if id_prefix:
        statement = statement.where(col(Sandbox.id).startswith(id_prefix))
    if cursor:
        created, last_id = decode_cursor(cursor)
        statement = statement.where(
            or_(
                col(Sandbox.created_at) < created,
                and_(col(Sandbox.created_at) == created, col(Sandbox.id) < last_id),
            )
        )
    statement = statement.order_by(col(Sandbox.created_at).desc(), col(Sandbox.id).desc())
    async with context.database.sessions() as session:
        if labels:
            # Label filtering happens in Python: JSON operators differ between SQLite and PostgreSQL.
            rows = list((await session.exec(statement)).all())
            rows = [row for row in rows if all(row.labels.get(k) == v for k, v in labels.items())]
            page = rows[: limit + 1]
        else:
            page = list((await session.exec(statement.limit(limit + 1))).all())
    next_cursor = encode_cursor(page[limit - 1]) if len(page) > limit else None
    return page[:limit], next_cursor


async def touch_activity(context: ApiContext, organization_id: str, id_or_name: str) -> None:
    async with context.database.sessions() as session:
        sandbox = await find_sandbox(session, organization_id, id_or_name)
        sandbox.last_activity_at = utc_now()
        session.add(sandbox)
        await session.commit()
    await refresh_desired(context, sandbox)  # activity for the auto-stop timer


async def release_built_sandbox(context: ApiContext, sandbox_id: str) -> None:
    """A sandbox waiting for its image goes on to `creating` once the image is ready (exactly once: CAS)."""
    async with context.database.sessions() as session:
        sandbox = await session.get(Sandbox, sandbox_id)
        if sandbox is None or sandbox.build_ref is None:
            return
        if SandboxState(sandbox.state) not in (SandboxState.PENDING_BUILD, SandboxState.BUILDING_SNAPSHOT):
            return
        build = (
            await session.exec(
                select(Snapshot).where(Snapshot.ref == sandbox.build_ref, col(Snapshot.hidden).is_(True))
            )
        ).first()
        if build is None or build.state != SnapshotState.ACTIVE.value:
            return
        image = build.registry_ref or build.ref or sandbox.image
        entrypoint = service_entrypoint(build.entrypoint)
        if not await transition(session, sandbox, SandboxState.CREATING, image=image, entrypoint=entrypoint):
            return  # someone else released it
        await session.commit()
    await announce(context, sandbox, SandboxAction.CREATE, DesiredState.STARTED)
    context.waiters.notify(sandbox_id)


async def fail_build_waiters(context: ApiContext, sandbox_ids: list[str], reason: str | None) -> None:
    for sandbox_id in sandbox_ids:
        async with context.database.sessions() as session:
            sandbox = await session.get(Sandbox, sandbox_id)
            if sandbox is None:
                continue
            if SandboxState(sandbox.state) not in (
                SandboxState.PENDING_BUILD,
                SandboxState.BUILDING_SNAPSHOT,
            ):
                continue
            if await transition(session, sandbox, SandboxState.BUILD_FAILED, error_reason=reason):
                await session.commit()
        context.waiters.notify(sandbox_id)


async def mark_building(context: ApiContext, sandbox_ids: list[str]) -> None:
    for sandbox_id in sandbox_ids:
        async with context.database.sessions() as session:
            sandbox = await session.get(Sandbox, sandbox_id)
            if sandbox is not None and sandbox.state == SandboxState.PENDING_BUILD:
                await transition(session, sandbox, SandboxState.BUILDING_SNAPSHOT)
                await session.commit()
