"""Private registries: which stored credentials an image pull needs, answered over NATS request/reply."""

from __future__ import annotations

import structlog
from nats.aio.msg import Msg
from sqlmodel import select

from tidepool_api.context import ApiContext
from tidepool_api.db import DockerRegistry
from tidepool_contracts import subjects
from tidepool_contracts.models import RegistryCredentialsReply, RegistryCredentialsRequest
from tidepool_runtime.bus import decode, encode

log = structlog.get_logger("tidepool.api.registries")
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
                password=context.secret_box.open(registry.password_sealed),
                server_address=host,
            )
    return RegistryCredentialsReply(found=False)


async def serve_credentials(context: ApiContext) -> None:
    """Answer pull-credential requests; a queue group spreads them over API replicas."""

    async def answer(msg: Msg) -> None:
        try:
            request = decode(RegistryCredentialsRequest, msg.data)
            reply = await credentials_for(context, request.organization_id, request.image)
        except Exception as error:
            log.warning("registry.credentials_failed", error=str(error))
            reply = RegistryCredentialsReply(found=False)
        await msg.respond(encode(reply))

    await context.bus.nc.subscribe(subjects.REGISTRY_CREDENTIALS_SUBJECT, queue="api", cb=answer)
