"""Registry mirrors in the runner (issue #15): an image of a mirrored registry that is not local is pulled
from the mirror and named locally as the sandbox asks for it; others are pulled as before. The engine here
is a stand-in recording the Docker API calls the runner makes (the real pull is in
tests/integration/test_registry_mirrors_sdk.py)."""

from __future__ import annotations

from typing import Any

import pytest
from aiodocker.exceptions import DockerError

from tidepool_runner.engine import ContainerEngine, SandboxFailedError
from tidepool_runtime.registry_mirrors import parse_registry_mirrors


class Images:
    def __init__(self, served: set[str]) -> None:
        self.served = served  # what a pull succeeds for
        self.local: set[str] = set()
        self.calls: list[tuple[str, ...]] = []

    async def inspect(self, name: str) -> dict[str, Any]:
        if name not in self.local:
            raise DockerError(404, {"message": f"no such image {name}"})
        return {"Id": name}

    async def pull(self, name: str, auth: Any = None) -> list[dict[str, Any]]:
        self.calls.append(("pull", name))
        if name not in self.served:
            raise DockerError(404, {"message": f"{name} not found"})
        self.local.add(name)
        return []

    async def tag(self, name: str, repo: str, tag: str) -> None:
        self.calls.append(("tag", name, f"{repo}:{tag}"))
        self.local.add(f"{repo}:{tag}")

    async def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.local.discard(name)


class Docker:
    def __init__(self, images: Images) -> None:
        self.images = images


MIRRORS = parse_registry_mirrors("docker.io=http://127.0.0.1:5001,docker.io=https://m2.example/hub")


async def test_a_docker_hub_image_comes_from_the_first_mirror_that_has_it() -> None:
    images = Images(served={"m2.example/hub/library/python:3.12-slim"})
    engine = ContainerEngine(Docker(images), mirrors=MIRRORS)  # type: ignore[arg-type]
    await engine.ensure_image("python:3.12-slim")
    assert images.calls == [
        ("pull", "127.0.0.1:5001/library/python:3.12-slim"),
        ("pull", "m2.example/hub/library/python:3.12-slim"),
        ("tag", "m2.example/hub/library/python:3.12-slim", "docker.io/library/python:3.12-slim"),
        ("delete", "m2.example/hub/library/python:3.12-slim"),
    ]
    assert images.local == {"docker.io/library/python:3.12-slim"}


async def test_no_mirror_serving_it_falls_back_to_the_registry_and_names_every_source() -> None:
    images = Images(served=set())
    engine = ContainerEngine(Docker(images), mirrors=MIRRORS)  # type: ignore[arg-type]
    with pytest.raises(SandboxFailedError) as failure:
        await engine.ensure_image("docker.io/library/node:22")
    assert [call[1] for call in images.calls] == [
        "127.0.0.1:5001/library/node:22",
        "m2.example/hub/library/node:22",
        "docker.io/library/node:22",
    ]
    assert "127.0.0.1:5001/library/node:22" in str(failure.value)


async def test_other_registries_and_authenticated_pulls_skip_the_mirrors() -> None:
    images = Images(served={"ghcr.io/org/tool:1", "docker.io/library/private:1"})
    login = {"username": "u", "password": "p", "serveraddress": "docker.io"}
    engine = ContainerEngine(
        Docker(images),  # type: ignore[arg-type]
        registry_auth=lambda image: login if "private" in image else None,
        mirrors=MIRRORS,
    )
    await engine.ensure_image("ghcr.io/org/tool:1")
    await engine.ensure_image("docker.io/library/private:1")
    assert images.calls == [("pull", "ghcr.io/org/tool:1"), ("pull", "docker.io/library/private:1")]
