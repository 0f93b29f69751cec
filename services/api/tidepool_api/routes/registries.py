"""`/docker-registry`: an organization's private registries (passwords encrypted, never returned)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import Response
from sqlmodel import select

from tidepool_api.db import DockerRegistry
from tidepool_api.errors import ApiError, bad_request, conflict, not_found
from tidepool_api.responses import JsonResponse
from tidepool_api.routes.deps import Caller, Context, RegistryDeleter, RegistryWriter
from tidepool_api.schemas import PlainName, Secret, Text, Url, WireModel, error_responses, iso
from tidepool_runtime.image_refs import (
    ReferenceRefusedError,
    check_registry_host,
    registry_host,
    same_registry,
)

router = APIRouter(prefix="/docker-registry", tags=["docker-registry"], responses=error_responses(401))


class CreateRegistryRequest(WireModel):
    """`CreateDockerRegistry` (SDK 0.226.1); the password is stored encrypted and never returned."""

    name: PlainName
    url: Url
    username: Text
    password: Secret
    project: Text | None = None


class UpdateRegistryRequest(WireModel):
    """`UpdateDockerRegistry`: a missing password keeps the stored one."""

    name: PlainName
    url: Url
    username: Text
    password: Secret | None = None
    project: Text | None = None


class RegistryDto(WireModel):
    """`DockerRegistry`, without the password."""

    id: str
    name: str
    url: str
    username: str
    project: str
    registry_type: str
    created_at: str
    updated_at: str


def registry_dto(registry: DockerRegistry) -> dict[str, object]:
    return {
        "id": registry.id,
        "name": registry.name,
        "url": registry.url,
        "username": registry.username,
        "project": registry.project,
        "registryType": registry.registry_type,
        "createdAt": iso(registry.created_at),
        "updatedAt": iso(registry.updated_at),
    }


def require_box(context: Context):  # type: ignore[no-untyped-def]
    if context.secret_box is None:
        raise ApiError(503, "secret storage is not configured")
    return context.secret_box


def check_registry_url(context: Context, url: str) -> None:
    """400 for the platform's internal registry or any registry on the platform's own host: credentials
    for it would only serve to pull from, or probe, the host's own ports (tidepool_runtime.image_refs)."""
    host = registry_host(url.strip())
    settings = context.settings
    if same_registry(host, settings.registry_url):
        raise bad_request(f"url: {url} is the platform's internal registry")
    try:
        check_registry_host(host, settings.allowed_host_registries, what=f"url: {url}")
    except ReferenceRefusedError as error:
        raise ApiError(error.status, error.message) from error


async def find_registry(context: Context, organization_id: str, registry_id: str) -> DockerRegistry:
    async with context.database.sessions() as session:
        registry = await session.get(DockerRegistry, registry_id)
    if registry is None or registry.organization_id != organization_id:
        raise not_found(f"Registry {registry_id} not found")
    return registry


@router.post("", status_code=201, response_model=RegistryDto, responses=error_responses(400, 409, 413, 503))
async def create_registry(
    context: Context, caller: RegistryWriter, body: CreateRegistryRequest
) -> JsonResponse:
    check_registry_url(context, body.url)
    box = require_box(context)
    registry = DockerRegistry(
        id=str(uuid.uuid4()),
        organization_id=caller.organization_id,
        name=body.name,
        url=body.url.strip(),
        username=body.username,
        password_sealed=box.seal(body.password),
        project=body.project or "",
    )
    async with context.database.sessions() as session:
        taken = await session.exec(
            select(DockerRegistry.id).where(
                DockerRegistry.organization_id == caller.organization_id, DockerRegistry.name == body.name
            )
        )
        if taken.first() is not None:
            raise conflict(f"Registry with name {body.name} already exists")
        session.add(registry)
        await session.commit()
    return JsonResponse(registry_dto(registry), status_code=201)


@router.get("", response_model=list[RegistryDto])
async def list_registries(context: Context, caller: Caller) -> JsonResponse:
    async with context.database.sessions() as session:
        rows = (
            await session.exec(
                select(DockerRegistry).where(DockerRegistry.organization_id == caller.organization_id)
            )
        ).all()
    return JsonResponse([registry_dto(row) for row in rows])


@router.get("/{registry_id}", response_model=RegistryDto, responses=error_responses(404))
async def get_registry(context: Context, caller: Caller, registry_id: str) -> JsonResponse:
    return JsonResponse(registry_dto(await find_registry(context, caller.organization_id, registry_id)))


@router.patch("/{registry_id}", response_model=RegistryDto, responses=error_responses(400, 404, 413, 503))
async def update_registry(
    context: Context, caller: RegistryWriter, registry_id: str, body: UpdateRegistryRequest
) -> JsonResponse:
    check_registry_url(context, body.url)
    registry = await find_registry(context, caller.organization_id, registry_id)
    registry.name, registry.url, registry.username = body.name, body.url.strip(), body.username
    if body.project is not None:
        registry.project = body.project
    if body.password is not None:
        registry.password_sealed = require_box(context).seal(body.password)
    registry.updated_at = datetime.now(UTC)
    async with context.database.sessions() as session:
        session.add(registry)
        await session.commit()
    return JsonResponse(registry_dto(registry))


@router.delete("/{registry_id}", status_code=204, response_class=Response, responses=error_responses(404))
async def delete_registry(context: Context, caller: RegistryDeleter, registry_id: str) -> Response:
    registry = await find_registry(context, caller.organization_id, registry_id)
    async with context.database.sessions() as session:
        row = await session.get(DockerRegistry, registry.id)
        if row is not None:
            await session.delete(row)
            await session.commit()
    return Response(status_code=204)
