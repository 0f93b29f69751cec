"""Warm pools through the official SDK (wire contract §2.8): a create that a pool member can serve is a claim
of an already started sandbox (observed: its id was in the pool, listed by the operator with
`includeWarm`), with the request's env vars, labels and name applied; concurrent creates get distinct
sandboxes; the pool refills; members belong to no tenant and a claimed one only to its claimer; an
organization's own pool holds its quota and serves its creates alone; a claimed member runs its snapshot's
entrypoint."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
from daytona import (
    AsyncDaytona,
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    Daytona,
    DaytonaConfig,
    DaytonaError,
    DaytonaNotFoundError,
    SessionExecuteRequest,
    WarmPool,
)
from daytona_api_client.exceptions import ApiException

from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("sdk_env")

POOL_SIZE = 2
SNAPSHOT = "daytona-small"
SETTLE_SECONDS = 180.0
# The toolbox daemon's serving process(es) (it runs as the sandbox user, so the user sees it).
WORKER_PIDS = (
    "for p in /proc/[0-9]*; do "
    '[ "$(cat $p/comm 2>/dev/null)" = tidepool-worker ] && echo ${p#/proc/}; done; true'
)


def warm_ids(admin: Daytona, pool_id: str) -> set[str]:
    """The pool's unclaimed, started members, as the operator sees them (`GET /sandbox?includeWarm=true`)."""
    page = admin._sandbox_api.list_sandboxes(include_warm=True, limit=200)
    return {item.id for item in page.items if item.warm_pool_id == pool_id and item.state == "started"}


def wait_for_pool(admin: Daytona, pool: WarmPool, size: int, owner: Daytona | None = None) -> set[str]:
    """Until the pool has `size` started members (the SDK's `current_size`, as its `owner` (default: the
    admin) lists it, and the operator's list agree)."""

    def settled() -> set[str] | None:
        current = next(p for p in (owner or admin).warm_pool.list() if p.id == pool.id)
        members = warm_ids(admin, pool.id)
        return members if current.current_size == size and len(members) == size else None

    return wait_until(settled, f"pool never had {size} started members", timeout=SETTLE_SECONDS, interval=0.5)


def delete_pool(admin: Daytona, owner: Daytona, pool: WarmPool) -> None:
    """Delete the pool and wait until its members are gone."""
    owner.warm_pool.delete(pool.id)
    wait_until(
        lambda: (
            not any(
                item.warm_pool_id == pool.id
                for item in admin._sandbox_api.list_sandboxes(include_warm=True, limit=200).items
            )
        ),
        "a deleted pool's members were not removed",
        timeout=SETTLE_SECONDS,
        interval=0.5,
    )


def new_organization(stack: StackThread) -> tuple[str, Daytona]:
    """(id, SDK client) of a new tenant organization, made by the admin."""
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"warm-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    return body["id"], Daytona(DaytonaConfig(api_key=body["apiKey"]["value"], api_url=stack.api_url))


@pytest.fixture(scope="module")
def admin() -> Daytona:
    return Daytona()


@pytest.fixture(scope="module")
def pool(admin: Daytona) -> Iterator[WarmPool]:
    created = admin.warm_pool.create(SNAPSHOT, pool=POOL_SIZE)
    assert (created.snapshot, created.pool, created.os_user) == (SNAPSHOT, POOL_SIZE, "daytona")
    try:
        wait_for_pool(admin, created, POOL_SIZE)
        yield created
    finally:
        admin.warm_pool.delete(created.id)
        wait_until(
            lambda: (
                not any(
                    item.warm_pool_id == created.id
                    for item in admin._sandbox_api.list_sandboxes(include_warm=True, limit=200).items
                )
            ),
            "a deleted pool's members were not removed",
            timeout=SETTLE_SECONDS,
            interval=0.5,
        )


@pytest.fixture(scope="module")
def other_key(stack: StackThread) -> str:
    """The key of a third organization (B), besides the admin's and `tenant`'s (A)."""
    created = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": f"warm-b-{uuid.uuid4().hex[:6]}"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["apiKey"]["value"])


@pytest.fixture(scope="module")
def other_tenant(stack: StackThread, other_key: str) -> Daytona:
    return Daytona(DaytonaConfig(api_key=other_key, api_url=stack.api_url))


def test_create_claims_a_pool_member_with_env_labels_and_name(
    admin: Daytona, pool: WarmPool, tenant: Daytona
) -> None:
    members = wait_for_pool(admin, pool, POOL_SIZE)
    name = f"claimed-{uuid.uuid4().hex[:8]}"
    sandbox = tenant.create(
        CreateSandboxFromSnapshotParams(
            env_vars={"GREETING": "from the claim"}, labels={"team": "a"}, name=name
        )
    )
    try:
        assert sandbox.id in members, "the create started a new sandbox instead of claiming a pool member"
        assert sandbox.state == "started"
        assert (sandbox.name, sandbox.env) == (name, {"GREETING": "from the claim"})
        assert sandbox.labels["team"] == "a"
        assert sandbox.organization_id not in (pool.organization_id, "00000000-0000-0000-0000-000000000000")
        assert sandbox.warm_pool_id is None
        # The daemon starts processes with the claimer's environment, not the pool's.
        assert sandbox.process.exec("echo $GREETING").result.strip() == "from the claim"
        assert sandbox.process.exec("echo $DAYTONA_ORGANIZATION_ID").result.strip() == sandbox.organization_id
        assert sandbox.process.exec("echo $DAYTONA_SANDBOX_ID").result.strip() == sandbox.id
        assert tenant.get(name).id == sandbox.id
        # Gone from the pool: the operator no longer lists it as a member, nor owns it.
        assert sandbox.id not in warm_ids(admin, pool.id)
        with pytest.raises(DaytonaNotFoundError):
            admin.get(sandbox.id)
    finally:
        tenant.delete(sandbox)


def test_env_reaches_sessions_and_survives_a_restart(admin: Daytona, pool: WarmPool, tenant: Daytona) -> None:
    members = wait_for_pool(admin, pool, POOL_SIZE)
    sandbox = tenant.create(CreateSandboxFromSnapshotParams(env_vars={"MODE": "claimed"}))
    try:
        assert sandbox.id in members
        sandbox.process.create_session("s")
        command = sandbox.process.execute_session_command("s", SessionExecuteRequest(command="echo $MODE"))
        assert command.stdout == "claimed\n"
        # A new toolbox worker (here: the old one killed from inside) starts with the claimer's env too.
        before = sandbox.process.exec(WORKER_PIDS).result.split()
        assert before, "no toolbox worker found"
        sandbox.process.exec(f"nohup sh -c 'sleep 0.5; kill -9 {' '.join(before)}' >/dev/null 2>&1 &")

        def new_worker_answers() -> str | None:
            try:
                workers = sandbox.process.exec(WORKER_PIDS).result.split()
                if not workers or not set(workers).isdisjoint(before):
                    return None
                return sandbox.process.exec("echo $MODE").result.strip()
            except Exception:  # the worker is being replaced
                return None

        assert wait_until(new_worker_answers, "no new toolbox worker answered", timeout=60) == "claimed"
        sandbox.stop()
        sandbox.start()
        # The container still has the pool's creation env: the runner gives the daemon the claimer's again.
        assert sandbox.process.exec("echo $MODE").result.strip() == "claimed"
    finally:
        tenant.delete(sandbox)


def test_concurrent_creates_get_distinct_sandboxes_and_the_pool_refills(
    admin: Daytona, pool: WarmPool, stack: StackThread, tenant_key: str
) -> None:
    members = wait_for_pool(admin, pool, POOL_SIZE)

    async def create_two() -> list[str]:
        async with AsyncDaytona(DaytonaConfig(api_key=tenant_key, api_url=stack.api_url)) as client:
            sandboxes = await asyncio.gather(*(client.create() for _ in range(POOL_SIZE)))
            ids = [sandbox.id for sandbox in sandboxes]
            outputs = await asyncio.gather(*(sandbox.process.exec("echo ok") for sandbox in sandboxes))
            assert [output.result.strip() for output in outputs] == ["ok"] * POOL_SIZE
            await asyncio.gather(*(client.delete(sandbox) for sandbox in sandboxes))
            return ids

    ids = asyncio.run(create_two())
    assert len(set(ids)) == POOL_SIZE, f"two creates got the same sandbox: {ids}"
    assert set(ids) <= members, "a create was cold although the pool had a started member for it"
    refilled = wait_for_pool(admin, pool, POOL_SIZE)
    assert not refilled & set(ids), "claimed sandboxes came back into the pool"


def test_a_create_the_pool_cannot_serve_is_cold(admin: Daytona, pool: WarmPool, tenant: Daytona) -> None:
    members = wait_for_pool(admin, pool, POOL_SIZE)
    sandbox = tenant.create(CreateSandboxFromSnapshotParams(os_user="root"))
    try:
        assert sandbox.id not in members
        assert sandbox.user == "root"
        assert wait_for_pool(admin, pool, POOL_SIZE) == members  # nothing was taken
    finally:
        tenant.delete(sandbox)


def test_members_belong_to_no_tenant_and_a_claimed_one_only_to_its_claimer(
    admin: Daytona, pool: WarmPool, tenant: Daytona, other_tenant: Daytona, other_key: str, stack: StackThread
) -> None:
    members = wait_for_pool(admin, pool, POOL_SIZE)
    for client in (tenant, other_tenant):
        listed = {item.id for item in client._sandbox_api.list_sandboxes(include_warm=True, limit=200).items}
        assert not listed & members, "a tenant sees unclaimed pool members"
        for member in members:
            with pytest.raises(DaytonaNotFoundError):
                client.get(member)
    admin_own = {item.id for item in admin._sandbox_api.list_sandboxes(limit=200).items}
    assert not admin_own & members, "pool members are listed without includeWarm"
    sandbox = tenant.create()
    try:
        assert sandbox.id in members
        listed_b = {item.id for item in other_tenant._sandbox_api.list_sandboxes(limit=200).items}
        assert sandbox.id not in listed_b
        with pytest.raises(DaytonaNotFoundError):
            other_tenant.get(sandbox.id)
        # B's key does not reach its toolbox through the proxy either.
        response = httpx.post(
            f"{stack.proxy_url}/toolbox/{sandbox.id}/process/execute",
            json={"command": "true"},
            headers={"Authorization": f"Bearer {other_key}"},
        )
        assert response.status_code == 404
        assert sandbox.id in {item.id for item in tenant._sandbox_api.list_sandboxes(limit=200).items}
    finally:
        tenant.delete(sandbox)


def test_warm_pool_calls(admin: Daytona, pool: WarmPool, tenant: Daytona) -> None:
    with pytest.raises(ApiException) as duplicate:
        admin.warm_pool.create(SNAPSHOT, pool=1)
    assert duplicate.value.status == 409
    with pytest.raises(ApiException) as unknown:
        tenant.warm_pool.create("no-such-snapshot", pool=1)
    assert unknown.value.status == 400
    # Another organization's pool does not exist for it.
    assert pool.id not in {p.id for p in tenant.warm_pool.list()}
    with pytest.raises(ApiException) as foreign:
        tenant.warm_pool.update(pool.id, pool=5)
    assert foreign.value.status == 404
    with pytest.raises(ApiException) as foreign_delete:
        tenant.warm_pool.delete(pool.id)
    assert foreign_delete.value.status == 404
    grown = admin.warm_pool.update(pool.id, pool=POOL_SIZE + 1)
    assert grown.pool == POOL_SIZE + 1
    wait_for_pool(admin, pool, POOL_SIZE + 1)
    shrunk = admin.warm_pool.update(pool.id, pool=POOL_SIZE)
    assert shrunk.pool == POOL_SIZE
    wait_for_pool(admin, pool, POOL_SIZE)


def test_an_organizations_pool_holds_its_quota_and_serves_it_alone(
    admin: Daytona, pool: WarmPool, other_tenant: Daytona, stack: StackThread
) -> None:
    owner_id, owner = new_organization(stack)
    operator = {"Authorization": f"Bearer {stack.api_key}"}
    quota = httpx.patch(
        f"{stack.api_url}/organizations/{owner_id}/quota", json={"totalCpuQuota": 3}, headers=operator
    )
    assert quota.status_code == 200, quota.text
    # daytona-small is 1 vCPU: 4 started members would not fit 3.
    with pytest.raises(ApiException) as over:
        owner.warm_pool.create(SNAPSHOT, pool=4)
    assert over.value.status == 403 and "Total CPU limit exceeded. Maximum allowed: 3." in str(
        over.value.body
    )
    own = owner.warm_pool.create(SNAPSHOT, pool=2)
    try:
        members = wait_for_pool(admin, own, 2, owner)
        usage = httpx.get(f"{stack.api_url}/organizations/{owner_id}/usage", headers=operator).json()
        assert usage["currentCpuUsage"] == 2, "the pool's members do not hold its organization's quota"
        # Another organization's create never takes them (the operator's pool serves it).
        foreign = other_tenant.create()
        try:
            assert foreign.id not in members
            assert wait_for_pool(admin, own, 2, owner) == members
        finally:
            other_tenant.delete(foreign)
        # The owner's create takes its own pool's member first.
        mine = owner.create()
        try:
            assert mine.id in members
            # Refilled within the quota: the claimed one and 2 members are its 3 vCPU; nothing more fits.
            wait_for_pool(admin, own, 2, owner)
            with pytest.raises(ApiException) as grow:
                owner.warm_pool.update(own.id, pool=3)
            assert grow.value.status == 403
            with pytest.raises(DaytonaError) as cold:
                owner.create(CreateSandboxFromSnapshotParams(os_user="root"))
            assert cold.value.status_code == 403 and "Total CPU limit exceeded" in str(cold.value)
        finally:
            owner.delete(mine)
    finally:
        delete_pool(admin, owner, own)


def test_a_claimed_member_runs_its_snapshots_entrypoint(admin: Daytona, stack: StackThread) -> None:
    _, owner = new_organization(stack)
    name = f"warm-entrypoint-{uuid.uuid4().hex[:8]}"
    server = [
        "python3",
        "-c",
        "print('entrypoint-up', flush=True); import http.server as s; "
        "s.test(s.SimpleHTTPRequestHandler, port=8080)",
    ]
    owner.snapshot.create(
        CreateSnapshotParams(name=name, image=ensure_python_slim_stand_in(), entrypoint=server)
    )
    own = owner.warm_pool.create(name, pool=1)
    try:
        members = wait_for_pool(admin, own, 1, owner)
        sandbox = owner.create(CreateSandboxFromSnapshotParams(snapshot=name))
        try:
            assert sandbox.id in members, "the create did not claim the pool's member"
            probe = (
                "import time, urllib.request\n"
                "for _ in range(50):\n"
                "    try:\n"
                "        print(urllib.request.urlopen('http://127.0.0.1:8080').status); break\n"
                "    except OSError:\n"
                "        time.sleep(0.1)\n"
            )
            assert sandbox.process.exec(f"python3 - <<'EOF'\n{probe}EOF").result.strip() == "200"
            assert "entrypoint-up" in sandbox.process.get_entrypoint_logs().stdout
        finally:
            owner.delete(sandbox)
    finally:
        delete_pool(admin, owner, own)
