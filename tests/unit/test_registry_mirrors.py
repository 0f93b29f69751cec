"""Registry mirrors (issue #15): the operator's setting, the references a mirror serves an image under, the
order pulls try, and the engines' registries.conf that `make up` writes for plain-http mirrors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tidepool_runtime.image_refs import parse_reference
from tidepool_runtime.registry_mirrors import (
    Mirror,
    PullFailedError,
    format_registry_mirrors,
    local_tag,
    mirrored_references,
    parse_registry_mirrors,
    pull_through_mirrors,
)
from tidepool_runtime.settings import BuilderSettings, RunnerSettings
from tidepool_stack.supervisor import Stack, StackConfig

DIGEST = "sha256:" + "ab" * 32


def test_mirrors_parse_in_order_per_registry_with_docker_hub_folded() -> None:
    parsed = parse_registry_mirrors(
        "docker.io=127.0.0.1:5000, index.docker.io=https://Mirror.example/hub/,quay.io=http://m2:80"
    )
    assert parsed == {
        "docker.io": [
            Mirror("127.0.0.1:5000", plain_http=True),  # loopback without scheme: plain http
            Mirror("mirror.example", prefix="hub"),
        ],
        "quay.io": [Mirror("m2:80", plain_http=True)],
    }
    assert parse_registry_mirrors("") == {}
    assert parse_registry_mirrors(format_registry_mirrors(parsed)) == parsed


def test_mirrors_parse_from_a_json_object() -> None:
    assert parse_registry_mirrors(
        '{"docker.io": "mirror.example", "ghcr.io": ["a.example", "b.example"]}'
    ) == {
        "docker.io": [Mirror("mirror.example")],
        "ghcr.io": [Mirror("a.example"), Mirror("b.example")],
    }


@pytest.mark.parametrize(
    "bad",
    [
        "docker.io",
        "=m",
        "docker.io=",
        "docker.io/library=m",
        "a=b//c",
        "a=ftp://m",
        "a=m/Upper",
        '["a=b"]',
        "{x",
    ],
)
def test_a_malformed_mirror_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"mirror|JSON|Expecting"):
        parse_registry_mirrors(bad)


def test_a_malformed_setting_stops_the_services_that_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDEPOOL_REGISTRY_MIRRORS", "docker.io")
    for settings in (BuilderSettings, RunnerSettings):
        with pytest.raises(ValueError, match="REGISTRY=MIRROR"):
            settings()
    monkeypatch.setenv("TIDEPOOL_REGISTRY_MIRRORS", "docker.io=http://127.0.0.1:5001")
    assert RunnerSettings().mirrors == {"docker.io": [Mirror("127.0.0.1:5001", plain_http=True)]}


@pytest.mark.parametrize(
    ("reference", "served_as"),
    [
        ("python:3.12-slim", "m:5000/library/python:3.12-slim"),  # the Docker way: docker.io/library/...
        ("docker.io/library/python:3.12-slim", "m:5000/library/python:3.12-slim"),
        ("index.docker.io/library/python", "m:5000/library/python"),
        ("bitnami/redis:7", "m:5000/bitnami/redis:7"),
        (f"python:3.12@{DIGEST}", f"m:5000/library/python:3.12@{DIGEST}"),
    ],
)
def test_a_docker_hub_reference_is_served_under_the_mirror(reference: str, served_as: str) -> None:
    mirrors = parse_registry_mirrors("docker.io=m:5000,docker.io=p.example/hub")
    assert mirrored_references(parse_reference(reference), mirrors) == [
        served_as,
        served_as.replace("m:5000", "p.example/hub"),
    ]


def test_other_registries_are_not_mirrored() -> None:
    mirrors = parse_registry_mirrors("docker.io=m:5000")
    assert mirrored_references(parse_reference("ghcr.io/org/tool:1"), mirrors) == []
    assert mirrored_references(parse_reference("localhost/tidepool/default:1"), mirrors) == []


def test_the_local_tag_follows_the_engine() -> None:
    assert local_tag(parse_reference("python:3.12")) == "3.12"
    assert local_tag(parse_reference("python")) == "latest"
    assert local_tag(parse_reference(f"python@{DIGEST}")) is None


async def test_pulls_try_each_mirror_then_the_registry_itself() -> None:
    mirrors = parse_registry_mirrors("docker.io=m1:5000,docker.io=m2:5000")
    tried: list[str] = []

    async def pull(candidate: str) -> None:
        tried.append(candidate)
        if not candidate.startswith("m2"):
            raise RuntimeError("unreachable")

    assert await pull_through_mirrors(parse_reference("node:22"), mirrors, pull) == "m2:5000/library/node:22"
    assert tried == ["m1:5000/library/node:22", "m2:5000/library/node:22"]

    async def nothing_serves(candidate: str) -> None:
        raise RuntimeError(f"no {candidate}")

    with pytest.raises(PullFailedError) as failure:
        await pull_through_mirrors(parse_reference("node:22"), mirrors, nothing_serves)
    for source in ("m1:5000/library/node:22", "m2:5000/library/node:22", "docker.io/library/node:22"):
        assert f"no {source}" in str(failure.value)


def test_registries_conf_marks_only_plain_http_mirrors_and_the_own_registry_insecure(tmp_path: Path) -> None:
    setting = "docker.io=127.0.0.1:5000,docker.io=mirror.example,ghcr.io=http://10.1.2.3:80/ghcr"
    stack = Stack(StackConfig(data_dir=tmp_path, registry_mirrors=setting))
    conf = tomllib.loads(stack.registries_conf("127.0.0.1:4999").read_text())
    assert conf["unqualified-search-registries"] == ["docker.io"]
    assert conf["registry"] == [
        {"location": "127.0.0.1:4999", "insecure": True},
        {"location": "127.0.0.1:5000", "insecure": True},
        {"location": "10.1.2.3:80", "insecure": True},
    ]
