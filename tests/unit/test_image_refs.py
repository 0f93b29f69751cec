"""Image ownership: per-organization build refs, and which references an organization may use."""

from __future__ import annotations

import socket

import pytest

from tidepool_runtime.image_refs import (
    ReferenceRefusedError,
    build_ref,
    check_reference,
    dockerfile_image_references,
    internal_registry_auth,
    parse_reference,
    registry_is_host_local,
    snapshot_ref,
)

ORG_A = "6f1c2a34-1d2e-4f00-9a7b-0123456789ab"
ORG_B = "9e8d7c6b-5a49-4f38-8e27-fedcba987654"
REGISTRY = "127.0.0.1:5123"
PLATFORM = ("localhost/tidepool/default:0.3.0", "localhost/tidepool/base:bookworm")


def check(text: str, organization: str = ORG_B) -> str:
    reference = check_reference(text, organization, internal_registry=REGISTRY, platform_images=PLATFORM)
    return reference.canonical


def refused(text: str, organization: str = ORG_B) -> tuple[int, str]:
    with pytest.raises(ReferenceRefusedError) as caught:
        check(text, organization)
    return caught.value.status, caught.value.message


def test_references_are_canonical() -> None:
    assert parse_reference("python:3.12").canonical == "docker.io/library/python:3.12"
    assert parse_reference("index.docker.io/acme/app:1").canonical == "docker.io/acme/app:1"
    assert parse_reference("Registry.Example.com:5000/a/b:v1").canonical == "registry.example.com:5000/a/b:v1"
    digest = "sha256:" + "a" * 64
    assert parse_reference(f"python@{digest}").canonical == f"docker.io/library/python@{digest}"
    for bad in ("", "UPPER/case:1", "a/../b:1", "x@sha256:zz", "host:99999x/a:1"):
        with pytest.raises(ValueError):
            parse_reference(bad)


def test_build_refs_belong_to_their_organization() -> None:
    dockerfile, hashes = "FROM python:3.12\nCOPY a /a\n", ["d41d8cd98f00b204e9800998ecf8427e"]
    a, b = build_ref(ORG_A, dockerfile, hashes), build_ref(ORG_B, dockerfile, hashes)
    assert a != b, "the same Dockerfile and context must not share a cached image across organizations"
    assert a.startswith(f"localhost/tidepool/build/{ORG_A}:")
    assert b.startswith(f"localhost/tidepool/build/{ORG_B}:")
    assert build_ref(ORG_A, dockerfile, hashes) == a, "deterministic: the organization's own cache key"
    assert build_ref(ORG_A, dockerfile, [*hashes, "x"]) != a
    assert snapshot_ref(ORG_A, "s-1") == f"localhost/tidepool/snapshot/{ORG_A}:s-1"


def test_public_private_platform_and_own_images_are_allowed() -> None:
    assert check("python:3.12.10-slim-bookworm") == "docker.io/library/python:3.12.10-slim-bookworm"
    assert check("ghcr.io/acme/tool:1.2") == "ghcr.io/acme/tool:1.2"
    assert check("localhost/tidepool/default:0.3.0") == "localhost/tidepool/default:0.3.0"
    assert check("localhost/tidepool/default:0.1.0"), "any tag of the platform's images"
    assert check("localhost/tidepool/base:bookworm")
    own = build_ref(ORG_B, "FROM x:1", [])
    assert check(own) == own
    assert check(snapshot_ref(ORG_B, "s-9"))


def test_another_organizations_local_images_are_not_found() -> None:
    for text in (
        build_ref(ORG_A, "FROM x:1", []),
        snapshot_ref(ORG_A, "s-1"),
        "localhost/tidepool/build:0123abcd",  # the shared repository of earlier versions
        "localhost/someone-elses-image:1",
        # Short names podman resolves by path suffix to localhost/tidepool/{build,snapshot}/...
        f"{ORG_A}:0123abcd",
        f"build/{ORG_A}:0123abcd",
        f"tidepool/snapshot/{ORG_A}:s-1",
        "build:0123abcd",
        "tidepool/build:0123abcd",
    ):
        status, message = refused(text)
        assert status == 404 and message == f"Image {text} not found", text
    assert check(f"{ORG_B}:0123abcd"), "its own short name is its own image"


def test_the_internal_registry_is_refused() -> None:
    for text in (
        f"{REGISTRY}/snapshots/tidepool/build/{ORG_A}:0123",
        "localhost:5123/snapshots/x:1",  # the same loopback registry under another name
        f"{REGISTRY}/snapshots/tidepool/build/{ORG_B}:0123",
    ):
        status, message = refused(text)
        assert status == 400 and "internal registry" in message, text
    # Another registry on the same host is not the internal one, but it is on the platform's own host.
    status, message = refused("127.0.0.1:6000/other/registry:1")
    assert status == 400 and "own host" in message
    assert refused("Not An Image")[0] == 400


def test_dockerfile_references_include_every_image_a_build_reads() -> None:
    dockerfile = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.12\n"
        "ARG TOOLS\n"
        "FROM --platform=linux/amd64 ${BASE} AS build\n"
        "RUN --mount=type=cache,target=/root/.cache \\\n"
        "    --mount=type=bind,from=ghcr.io/acme/src:1,target=/src make\n"
        "RUN <<EOF\n"
        "FROM not-an-instruction:1\n"
        "EOF\n"
        "FROM scratch\n"
        "COPY --from=build /out /out\n"
        "COPY --from=registry.example.com/bin:2 /bin/x /x\n"
        "COPY --from=0 /a /a\n"
        "FROM ${TOOLS:-debian:bookworm}\n"
    )
    assert dockerfile_image_references(dockerfile) == [
        "python:3.12",
        "ghcr.io/acme/src:1",
        "registry.example.com/bin:2",
        "debian:bookworm",
    ]
    with pytest.raises(ValueError, match="TOOLS"):
        dockerfile_image_references("ARG TOOLS\nFROM $TOOLS\n")
    assert dockerfile_image_references("FROM a:1 AS x\nFROM X\n") == ["a:1"], "stage names are case-blind"


def test_internal_registry_login_goes_to_that_registry_only() -> None:
    image = f"{REGISTRY}/snapshots/tidepool/build/{ORG_A}:0123"
    assert internal_registry_auth(image, REGISTRY, "tidepool", "pw") == {
        "username": "tidepool",
        "password": "pw",
        "serveraddress": REGISTRY,
    }
    assert internal_registry_auth("ghcr.io/acme/tool:1", REGISTRY, "tidepool", "pw") is None
    assert internal_registry_auth("python:3.12", REGISTRY, "tidepool", "pw") is None
    assert internal_registry_auth(image, REGISTRY, "", "") is None


@pytest.mark.parametrize(
    "image",
    [
        "0.0.0.0:5000/x/y:1",
        "[::]:5000/x/y:1",
        "127.1:5000/x/y:1",
        "[::1]:5000/x/y:1",
        "169.254.169.254/x/y:1",
        f"{socket.gethostname()}:4222/x/y:1",
    ],
)
def test_registries_on_the_platforms_own_host_are_refused(image: str) -> None:
    with pytest.raises(ReferenceRefusedError) as refused:
        check_reference(image, ORG_A, internal_registry="", platform_images=())
    assert refused.value.status == 400
    assert "own host" in refused.value.message


def test_an_operator_may_allow_a_host_registry() -> None:
    reference = check_reference(
        "127.0.0.1:5999/x/y:1",
        ORG_A,
        internal_registry="",
        platform_images=(),
        allowed_host_registries=["127.0.0.1:5999"],
    )
    assert reference.host == "127.0.0.1:5999"
    with pytest.raises(ReferenceRefusedError):
        check_reference(
            "127.0.0.1:6000/x/y:1",
            ORG_A,
            internal_registry="",
            platform_images=(),
            allowed_host_registries=["127.0.0.1:5999"],
        )


def test_remote_and_unresolvable_registries_are_not_host_local() -> None:
    assert not registry_is_host_local("192.0.2.200:5000")  # TEST-NET-1: not this host's address
    assert not registry_is_host_local("registry.invalid:5000")
