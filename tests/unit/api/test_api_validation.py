"""Issue #9 item 2: every bad input is a 400 naming the field, and nothing is created or published.

Through REST against the real FastAPI app, real SQLite and a real nats-server (the `api` fixture). "Nothing
created" means: no new row in the table the route writes, and no new message on the intents or jobs stream
(their last sequence number is unchanged, whether or not anything consumed them).
"""

from __future__ import annotations

from typing import Any

import pytest
from daytona_api_client.models.sandbox import Sandbox as SdkSandbox
from sqlalchemy import func
from sqlmodel import select
from test_api_service import api  # noqa: F401 (the fixture, shared with the API service tests)

from tidepool_api.db import ApiKey, DockerRegistry, Organization, Sandbox, Snapshot
from tidepool_api.schemas import ListSandboxesDto, PaginatedSnapshotsDto, SandboxDto, SandboxLabelsDto
from tidepool_contracts import subjects

HEX32 = "0123456789abcdef" * 2

# (body, field named in the message)
BAD_SANDBOXES: list[tuple[Any, str]] = [
    ({"env": {"A\u0000B": "x"}}, "env"),
    ({"env": {"A=B": "x"}}, "env"),
    ({"env": {"": "x"}}, "env"),
    ({"env": {"K" * 300: "x"}}, "env"),
    ({"env": {"A": "x\u0000y"}}, "env"),
    ({"env": {"A": "v" * (33 * 1024)}}, "env"),
    ({"env": {f"K{index}": "x" for index in range(600)}}, "env"),
    ({"env": ["A=1"]}, "env"),
    # Under the body limit, but too big for one bus message once in an intent.
    ({"env": {f"K{i}": "\u0001" * 20000 for i in range(8)}, "labels": {"a": "b"}}, "env and labels"),
    ({"env": {"A": 1}}, "env.A"),
    ({"user": "a b;id"}, "user"),
    ({"user": "u" * 200}, "user"),
    ({"user": ""}, "user"),
    ({"user": "Root"}, "user"),
    ({"user": "1abc"}, "user"),
    ({"autoDeleteInterval": -7}, "autoDeleteInterval"),
    ({"autoDeleteInterval": 2**40}, "autoDeleteInterval"),
    ({"autoStopInterval": -1}, "autoStopInterval"),
    ({"autoStopInterval": 1.5}, "autoStopInterval"),
    ({"autoArchiveInterval": -5}, "autoArchiveInterval"),
    ({"name": "a/b"}, "name"),
    ({"name": "a\u0000b"}, "name"),
    ({"name": "n" * 10240}, "name"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "line\nbreak"}, "name"),
    ({"name": 7}, "name"),
    ({"labels": {f"k{index}": "v" for index in range(10000)}}, "labels"),
    ({"labels": {"k" * (100 * 1024): "v"}}, "labels"),
    ({"labels": {"": "v"}}, "labels"),
    ({"labels": {"k": "v" * 2000}}, "labels"),
    ({"labels": {"k": "a\u0000b"}}, "labels"),
    ({"labels": {"k": 1}}, "labels.k"),
    ({"buildInfo": {"dockerfileContent": "FROM alpine:3.20", "contextHashes": ["../x"]}}, "contextHashes"),
    (
        {"buildInfo": {"dockerfileContent": "FROM alpine:3.20", "contextHashes": [HEX32.upper()]}},
        "contextHashes",
    ),
    ({"buildInfo": {"dockerfileContent": "FROM alpine:3.20", "contextHashes": "abc"}}, "contextHashes"),
    ({"buildInfo": {"dockerfileContent": ""}}, "buildInfo.dockerfileContent"),
    ({"buildInfo": {"dockerfileContent": "FROM a\u0000"}}, "buildInfo.dockerfileContent"),
    ({"buildInfo": {}}, "buildInfo.dockerfileContent"),
    ({"cpu": "2"}, "cpu"),
    ({"cpu": 0}, "cpu"),
    ({"cpu": True}, "cpu"),
    ({"memory": 2**40}, "memory"),
    ({"disk": -1}, "disk"),
    ({"gpu": -1}, "gpu"),
    ({"public": "yes"}, "public"),
    ({"networkBlockAll": 1}, "networkBlockAll"),
    ({"target": "../x"}, "target"),
    ({"target": ""}, "target"),
    ({"snapshot": "a b"}, "snapshot"),
    ({"snapshot": "../etc"}, "snapshot"),
    ({"networkAllowList": "1.2.3.4"}, "networkAllowList"),
    ({"networkAllowList": "300.0.0.0/8"}, "networkAllowList"),
    ({"networkAllowList": ",".join(f"10.0.{index}.0/24" for index in range(11))}, "networkAllowList"),
    ({"volumes": [{"volumeId": 1, "mountPath": "/data"}]}, "volumes.0.volumeId"),
    ({"volumes": [{"volumeId": "v"}]}, "volumes.0.mountPath"),
]


async def count(context, model) -> int:  # type: ignore[no-untyped-def]
    async with context.database.sessions() as session:
        return int((await session.exec(select(func.count()).select_from(model))).one())


async def last_sequences(context) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    intents = await context.bus.jetstream.stream_info(subjects.INTENTS_STREAM)
    jobs = await context.bus.jetstream.stream_info(subjects.JOBS_STREAM)
    return intents.state.last_seq, jobs.state.last_seq


def assert_names(response, field: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["statusCode"] == 400 and body["error"] == "Bad Request"
    assert field in body["message"], body["message"]
    assert len(response.content) < 4096  # the answer never echoes a huge input


@pytest.mark.parametrize(("body", "field"), BAD_SANDBOXES)
async def test_bad_sandbox_create_is_refused_and_leaves_nothing(api, body: Any, field: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    before = (await count(context, Sandbox), await count(context, Snapshot), await last_sequences(context))
    response = await client.post("/api/sandbox", json=body)
    assert_names(response, field)
    after = (await count(context, Sandbox), await count(context, Snapshot), await last_sequences(context))
    assert after == before


async def test_good_values_at_the_limits_are_accepted(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    body = {
        "name": "edge-ok",
        "user": "_svc-user_01",
        "env": {"PATH_EXTRA": "a=b;c", "EMPTY": ""},
        "labels": {f"k{index}": "v" for index in range(64)},
        "autoDeleteInterval": -1,
        "autoStopInterval": 0,
        "autoArchiveInterval": 0,
        "networkAllowList": "10.0.0.0/8, 192.168.1.0/24",
        "unknownFieldFromANewerSdk": {"ignored": True},
    }
    response = await client.post("/api/sandbox", json=body)
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["user"] == "_svc-user_01" and created["autoDeleteInterval"] == -1
    SandboxDto.model_validate(created)
    # The documented shape is the one the official SDK parses.
    assert SdkSandbox.from_dict(created).user == "_svc-user_01"
    # An empty body (or none at all) is a valid create, as in Daytona.
    assert (await client.post("/api/sandbox")).status_code == 200
    listed = await client.get("/api/sandbox", params=[("states", "creating"), ("states", "started")])
    assert listed.status_code == 200
    assert {item.name for item in ListSandboxesDto.model_validate(listed.json()).items} >= {"edge-ok"}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"states": "garbage"}, "states"),
        ({"states": ["started", "nope"]}, "states.1"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"name": "n" * 300}, "name"),
        ({"id": "i" * 300}, "id"),
        ({"cursor": "c" * 600}, "cursor"),
        ({"cursor": "!!!"}, "cursor"),
        ({"labels": "[1]"}, "labels"),
        ({"labels": '{"a": 1}'}, "labels"),
        ({"labels": "{not json"}, "labels"),
    ],
)
async def test_bad_sandbox_list_query_is_refused(api, params: dict[str, Any], field: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    assert_names(await client.get("/api/sandbox", params=params), field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"labels": {"": "x"}}, "labels"),
        ({"labels": {f"k{index}": "v" for index in range(100)}}, "labels"),
        ({"labels": {"k": "v" * 2000}}, "labels"),
        ({"labels": ["a"]}, "labels"),
        ({}, "labels"),
    ],
)
async def test_bad_labels_replacement_changes_nothing(api, body: Any, field: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    created = (await client.post("/api/sandbox", json={"labels": {"keep": "me"}})).json()
    assert_names(await client.put(f"/api/sandbox/{created['id']}/labels", json=body), field)
    assert (await client.get(f"/api/sandbox/{created['id']}")).json()["labels"] == {"keep": "me"}
    good = await client.put(f"/api/sandbox/{created['id']}/labels", json={"labels": {"new": "one"}})
    assert SandboxLabelsDto.model_validate(good.json()).labels == {"new": "one"}


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("autodelete/-7", "auto-delete"),
        ("autostop/-1", "auto stop"),
        ("autoarchive/-1", "auto archive"),
        (f"autostop/{2**40}", "minutes"),
        ("autostop/soon", "minutes"),
    ],
)
async def test_bad_interval_changes_nothing(api, path: str, field: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    created = (await client.post("/api/sandbox", json={})).json()
    assert_names(await client.post(f"/api/sandbox/{created['id']}/{path}"), field)
    again = (await client.get(f"/api/sandbox/{created['id']}")).json()
    intervals = ("autoStopInterval", "autoArchiveInterval", "autoDeleteInterval")
    assert [again[key] for key in intervals] == [created[key] for key in intervals]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "a b", "imageName": "alpine:3.20"}, "name"),
        ({"name": "", "imageName": "alpine:3.20"}, "name"),
        ({"name": "n" * 300, "imageName": "alpine:3.20"}, "name"),
        ({"imageName": "alpine:3.20"}, "name"),
        ({"name": "s1", "imageName": "alpine\u0000:3.20"}, "imageName"),
        ({"name": "s1", "imageName": ""}, "imageName"),
        ({"name": "s1", "imageName": "alpine:3.20", "entrypoint": ["x"] * 100}, "entrypoint"),
        ({"name": "s1", "imageName": "alpine:3.20", "entrypoint": "sleep"}, "entrypoint"),
        ({"name": "s1", "imageName": "alpine:3.20", "cpu": 0}, "cpu"),
        ({"name": "s1", "imageName": "alpine:3.20", "memory": "1"}, "memory"),
        ({"name": "s1", "imageName": "alpine:3.20", "gpu": -1}, "gpu"),
        (
            {"name": "s1", "buildInfo": {"dockerfileContent": "FROM alpine:3.20", "contextHashes": ["../x"]}},
            "contextHashes",
        ),
        ({"name": "s1", "buildInfo": {"dockerfileContent": " "}}, "buildInfo.dockerfileContent"),
    ],
)
async def test_bad_snapshot_create_leaves_nothing(api, body: Any, field: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    before = (await count(context, Snapshot), await last_sequences(context))
    assert_names(await client.post("/api/snapshots", json=body), field)
    assert (await count(context, Snapshot), await last_sequences(context)) == before


@pytest.mark.parametrize(
    ("params", "field"),
    [({"page": "0"}, "page"), ({"limit": "500"}, "limit"), ({"name": "n" * 300}, "name")],
)
async def test_bad_snapshot_list_query_is_refused(api, params: dict[str, str], field: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    assert_names(await client.get("/api/snapshots", params=params), field)
    PaginatedSnapshotsDto.model_validate((await client.get("/api/snapshots")).json())


REGISTRY = {"name": "r", "url": "registry.example.com", "username": "u", "password": "p"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**REGISTRY, "name": ""}, "name"),
        ({**REGISTRY, "name": "a/b"}, "name"),
        ({**REGISTRY, "url": ""}, "url"),
        ({**REGISTRY, "url": "https://x\u0000"}, "url"),
        ({**REGISTRY, "url": "u" * 5000}, "url"),
        ({**REGISTRY, "password": "p\u0000"}, "password"),
        ({**REGISTRY, "username": "u\n"}, "username"),
        ({**REGISTRY, "project": "p" * 300}, "project"),
        ({key: value for key, value in REGISTRY.items() if key != "password"}, "password"),
    ],
)
async def test_bad_registry_is_refused_and_not_stored(api, body: Any, field: str) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    assert_names(await client.post("/api/docker-registry", json=body), field)
    assert await count(context, DockerRegistry) == 0


@pytest.mark.parametrize(
    ("path", "body", "field", "model"),
    [
        ("/api/organizations", {"name": ""}, "name", Organization),
        ("/api/organizations", {"name": "o" * 300}, "name", Organization),
        ("/api/organizations", {}, "name", Organization),
        ("/api/api-keys", {"name": "a/b"}, "name", ApiKey),
        ("/api/api-keys", {"name": ""}, "name", ApiKey),
        ("/api/api-keys", {"name": "k", "expiresAt": "someday"}, "expiresAt", ApiKey),
        ("/api/api-keys", {"name": "k", "permissions": "all"}, "permissions", ApiKey),
    ],
)
async def test_bad_organization_or_key_is_refused(api, path: str, body: Any, field: str, model: Any) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, context, _ = api
    before = await count(context, model)
    assert_names(await client.post(path, json=body), field)
    assert await count(context, model) == before


async def test_openapi_documents_bodies_and_errors(api) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    client, _, _ = api
    # (An authenticated call first: a session whose last test never reaches the database hangs in the
    # fixture's teardown, also before this change; not investigated further.)
    assert (await client.get("/api/sandbox")).status_code == 200
    spec = (await client.get("/api/openapi.json")).json()
    paths = spec["paths"]
    body_routes = [
        ("/api/sandbox", "post"),
        ("/api/sandbox/{sandbox_id_or_name}/labels", "put"),
        ("/api/snapshots", "post"),
        ("/api/docker-registry", "post"),
        ("/api/docker-registry/{registry_id}", "patch"),
        ("/api/organizations", "post"),
        ("/api/api-keys", "post"),
    ]
    for path, method in body_routes:
        operation = paths[path][method]
        assert "application/json" in operation["requestBody"]["content"], (path, method)
        assert {"400", "401", "413"} <= set(operation["responses"]), (path, method)
    create = spec["components"]["schemas"]["CreateSandboxRequest"]["properties"]
    assert create["autoDeleteInterval"]["anyOf"][0]["minimum"] == -1
    assert (
        "SandboxDto"
        in paths["/api/sandbox"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    )
    states = paths["/api/sandbox"]["get"]["parameters"]
    assert any(parameter["name"] == "states" for parameter in states)
    # Validation errors are 400 (as Daytona's), never FastAPI's default 422.
    assert all("422" not in operation["responses"] for item in paths.values() for operation in item.values())
