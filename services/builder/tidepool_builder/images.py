"""Engine operations around builds: pulling a source image, inspecting it, pushing it to the registry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import aiodocker

from tidepool_runtime.image_refs import ImageReference, parse_reference
from tidepool_runtime.registry_mirrors import (
    Mirror,
    PullFailedError,
    local_tag,
    mirrored_references,
    pull_through_mirrors,
)

# The builder reads only its own concerns (runtime settings.py); `Settings` here means those.


class ImageUnusableError(Exception):
    """The image exists but cannot host a sandbox (e.g. it cannot be pulled)."""


@dataclass(frozen=True)
class ImageFacts:
    entrypoint: list[str] | None
    size_bytes: int | None


async def inspect_image(docker: aiodocker.Docker, ref: str) -> ImageFacts:
    info = await docker.images.inspect(ref)
    config = info.get("Config") or {}
    entrypoint = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    return ImageFacts(entrypoint=entrypoint or None, size_bytes=info.get("Size"))


def _names_match(reference: ImageReference, names: list[str]) -> bool:
    for name in names:
        try:
            if parse_reference(name).canonical == reference.canonical:
                return True
        except ValueError:
            continue
    return False


async def find_local_image(docker: aiodocker.Docker, reference: ImageReference) -> str | None:
    """The id of the local image named exactly `reference`, else None.

    The engine's own lookup is not used as the answer: podman resolves short names by path suffix and
    `any-name@digest` by digest alone, which would hand one organization another's image.
    """
    try:
        info = await docker.images.inspect(reference.canonical)
    except aiodocker.DockerError as error:
        if error.status == 404:
            return None
        raise
    if reference.digest:
        by_digest = reference.tag is None or _names_match(
            ImageReference(reference.host, reference.path, reference.tag), list(info.get("RepoTags") or [])
        )
        digests = [name for name in info.get("RepoDigests") or [] if "@" in name]
        exact = _names_match(ImageReference(reference.host, reference.path, None, reference.digest), digests)
        return str(info["Id"]) if exact and by_digest else None
    return str(info["Id"]) if _names_match(reference, list(info.get("RepoTags") or [])) else None


async def _pull(docker: aiodocker.Docker, reference: ImageReference, auth: dict[str, str] | None) -> None:
    progress = await docker.images.pull(reference.canonical, auth=auth)
    for entry in progress if isinstance(progress, list) else [progress]:
        if isinstance(entry, dict) and entry.get("error"):
            raise aiodocker.DockerError(500, {"message": str(entry["error"])})


async def _pull_anonymously(
    docker: aiodocker.Docker, reference: ImageReference, mirrors: Mapping[str, Sequence[Mirror]]
) -> ImageReference:
    """Pull `reference` through its registry's mirrors (then the registry itself) and return the name it
    now has locally: a mirror's image is also tagged with `reference`'s own name (unless `reference` names
    a digest only, which cannot be a tag), and the mirror's name is dropped again."""
    if not mirrored_references(reference, mirrors):
        await _pull(docker, reference, None)
        return reference

    async def pull(candidate: str) -> None:
        await _pull(docker, parse_reference(candidate), None)

    try:
        pulled = parse_reference(await pull_through_mirrors(reference, mirrors, pull))
    except PullFailedError as error:
        message = f"tried its mirrors and its registry: {error}"
        raise aiodocker.DockerError(404, {"message": message}) from None
    tag = local_tag(reference)
    if pulled.canonical == reference.canonical or tag is None:
        return pulled
    image_id = await find_local_image(docker, pulled)
    if image_id is None:
        return pulled
    await docker.images.tag(image_id, repo=reference.repository, tag=tag)
    with contextlib.suppress(aiodocker.DockerError):
        await docker.images.delete(pulled.canonical)  # only that name: the image keeps reference's
    return ImageReference(reference.host, reference.path, tag)


async def ensure_source_image(
    docker: aiodocker.Docker,
    source: str,
    ref: str,
    auth: dict[str, str] | None = None,
    mirrors: Mapping[str, Sequence[Mirror]] | None = None,
) -> None:
    """Make `source` available locally as `ref` (the snapshot's own name).

    Without credentials: the local image of exactly that name, else an anonymous pull (through the
    registry's mirrors first, tidepool_runtime.registry_mirrors). With the organization's credentials:
    always a pull with them from the registry itself (which proves the organization may read the image;
    credentials never go to a mirror), and a name the pull added is removed again afterwards, so that an
    image pulled with one organization's credentials is reachable only under that organization's `ref`.
    Callers serialise calls (another build must not find the name in between).
    """
    try:
        reference = parse_reference(source)
    except ValueError as error:
        raise ImageUnusableError(f"invalid image name {source}: {error}") from error
    existed = await find_local_image(docker, reference)
    local = reference
    try:
        if auth is not None:
            await _pull(docker, reference, auth)
        elif existed is None:
            local = await _pull_anonymously(docker, reference, mirrors or {})
    except aiodocker.DockerError as error:
        where = "could not be pulled with the organization's registry credentials"
        if auth is None:
            where = "is not available locally and could not be pulled"
        raise ImageUnusableError(f"image {source} {where}: {error.message}") from error
    image_id = await find_local_image(docker, local)
    if image_id is None:
        raise ImageUnusableError(f"image {source} was pulled but is not in the image store under that name")
    repository, _, tag = ref.rpartition(":")
    await docker.images.tag(image_id, repo=repository, tag=tag)
    if auth is not None and existed is None:
        name = reference.canonical
        with contextlib.suppress(aiodocker.DockerError):
            await docker.images.delete(name)  # only a name: `ref` still holds the image


async def ensure_build_sources(
    docker: aiodocker.Docker, sources: Iterable[str], mirrors: Mapping[str, Sequence[Mirror]]
) -> None:
    """Pull the images a Dockerfile reads (FROM, `--from=`) that are missing locally and whose registry has
    mirrors, through those mirrors, under their own names: the engine's build then finds them locally
    instead of pulling them from the registry itself. Others are left to the engine, as before.
    ImageUnusableError when one can be had from neither its mirrors nor its registry."""
    for source in sources:
        try:
            reference = parse_reference(source)
        except ValueError:
            continue  # the build reports it
        if not mirrored_references(reference, mirrors) or await find_local_image(docker, reference):
            continue
        try:
            await _pull_anonymously(docker, reference, mirrors)
        except aiodocker.DockerError as error:
            raise ImageUnusableError(f"image {source} could not be pulled: {error.message}") from error


def registry_reference(registry: str, image_ref: str) -> tuple[str, str]:
    """Where `image_ref` lives in the platform registry: (repository, tag)."""
    name, _, tag = image_ref.rpartition(":")
    if not name or "/" in tag:
        name, tag = image_ref, "latest"
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest  # drop the source registry host; keep the path
    return f"{registry}/snapshots/{name}", tag


async def push_to_registry(
    docker: aiodocker.Docker, registry: str, image_ref: str, auth: dict[str, str] | None = None
) -> str:
    """Tag and push the image so other runners can pull it; returns the pullable reference.

    `auth` ({username, password, serveraddress}) is sent as X-Registry-Auth; None pushes anonymously.
    """
    repository, tag = registry_reference(registry, image_ref)
    await docker.images.tag(image_ref, repo=repository, tag=tag)
    # An empty credential set: anonymous push (the engine rejects aiodocker's placeholder header).
    progress = await docker.images.push(repository, tag=tag, auth=auth or {})
    for entry in progress if isinstance(progress, list) else [progress]:
        if isinstance(entry, dict) and entry.get("error"):
            raise aiodocker.DockerError(500, {"message": str(entry["error"])})
    return f"{repository}:{tag}"
