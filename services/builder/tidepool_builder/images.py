"""Engine operations around builds: pulling a source image, inspecting it, proving it can run the toolbox."""

from __future__ import annotations

from dataclasses import dataclass

import aiodocker

from tidepool_contracts.config import Settings


class ImageUnusableError(Exception):
    """The image exists but cannot host a sandbox (e.g. no python3 for the toolbox daemon)."""


@dataclass(frozen=True)
class ImageFacts:
    entrypoint: list[str] | None
    size_bytes: int | None


async def inspect_image(docker: aiodocker.Docker, ref: str) -> ImageFacts:
    info = await docker.images.inspect(ref)
    config = info.get("Config") or {}
    entrypoint = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    return ImageFacts(entrypoint=entrypoint or None, size_bytes=info.get("Size"))


async def ensure_source_image(
    docker: aiodocker.Docker, source: str, ref: str, auth: dict[str, str] | None = None
) -> None:
    """Make `source` available locally as `ref`: use the local copy, else pull it (with `auth` if given)."""
    try:
        await docker.images.inspect(source)
    except aiodocker.DockerError:
        try:
            progress = await docker.images.pull(source, auth=auth)
            for entry in progress if isinstance(progress, list) else [progress]:
                if isinstance(entry, dict) and entry.get("error"):
                    raise aiodocker.DockerError(500, {"message": str(entry["error"])})
        except aiodocker.DockerError as error:
            raise ImageUnusableError(
                f"image {source} is not available locally and could not be pulled: {error.message}"
            ) from error
    if ref != source:
        repository, _, tag = ref.rpartition(":")
        await docker.images.tag(source, repo=repository, tag=tag)


async def verify_toolbox_can_run(docker: aiodocker.Docker, settings: Settings, ref: str) -> None:
    """The daemon runs on the image's own python3: refuse images without one instead of failing later."""
    config = {
        "Image": ref,
        "Entrypoint": ["python3", "-c", "import sys; assert sys.version_info >= (3, 8)"],
        "Cmd": None,
        "User": "0",
        "NetworkDisabled": True,
        "HostConfig": {
            "Ulimits": [
                {"Name": "nofile", "Soft": settings.container_nofile, "Hard": settings.container_nofile},
                {"Name": "nproc", "Soft": settings.container_nproc, "Hard": settings.container_nproc},
            ],
            "NetworkMode": "none",
        },
    }
    container = await docker.containers.create(config=config)
    try:
        try:
            await container.start()
        except aiodocker.DockerError as error:
            raise ImageUnusableError(
                f"image {ref} has no usable python3 (needed by the sandbox toolbox): {error.message}"
            ) from error
        result = await container.wait(timeout=60)
        if result.get("StatusCode") != 0:
            raise ImageUnusableError(
                f"image {ref} has no usable python3 >= 3.8 (needed by the sandbox toolbox)"
            )
    finally:
        await container.delete(force=True)


def registry_reference(registry: str, image_ref: str) -> tuple[str, str]:
    """Where `image_ref` lives in the platform registry: (repository, tag)."""
    name, _, tag = image_ref.rpartition(":")
    if not name or "/" in tag:
        name, tag = image_ref, "latest"
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest  # drop the source registry host; keep the path
    return f"{registry}/snapshots/{name}", tag


async def push_to_registry(docker: aiodocker.Docker, registry: str, image_ref: str) -> str:
    """Tag and push the image so other runners can pull it; returns the pullable reference."""
    repository, tag = registry_reference(registry, image_ref)
    await docker.images.tag(image_ref, repo=repository, tag=tag)
    # An empty credential set: anonymous push (the engine rejects aiodocker's placeholder header).
    progress = await docker.images.push(repository, tag=tag, auth={})
    for entry in progress if isinstance(progress, list) else [progress]:
        if isinstance(entry, dict) and entry.get("error"):
            raise aiodocker.DockerError(500, {"message": str(entry["error"])})
    return f"{repository}:{tag}"
