"""Private registries: which stored credentials an image pull needs (asked by the builder over the bus)."""

from __future__ import annotations

from sqlmodel import select

from tidepool_api.context import ApiContext
from tidepool_api.db import DockerRegistry
from tidepool_contracts.models import RegistryCredentialsReply

DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def registry_host(url: str) -> str:
    host = url.split("://", 1)[-1].split("/", 1)[0].lower()
    return "docker.io" if host in DOCKER_HUB_ALIASES else host


def image_host(image: str) -> str:
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return registry_host(first)
    return "docker.io"


async def credentials_for(context: ApiContext, organization_id: str, image: str) -> RegistryCredentialsReply:
    host = image_host(image)
    async with context.database.sessions() as session:
        registries = (
            await session.exec(
                select(DockerRegistry).where(DockerRegistry.organization_id == organization_id)
            )
        ).all()
    for registry in registries:
        if registry_host(registry.url) == host and context.secret_box is not None:
            return RegistryCredentialsReply(
                found=True,
                username=registry.username,
                # Sealed for the builder: nobody else on the bus can open it.
                password=context.registry_sealer.seal(context.secret_box.open(registry.password_sealed)),
                server_address=host,
            )
    return RegistryCredentialsReply(found=False)
