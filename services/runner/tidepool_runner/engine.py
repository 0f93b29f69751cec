"""The container engine as the runner needs it: a thin, typed layer over aiodocker (Docker Engine API, which
Podman's compat socket also speaks), translating engine failures into transient vs. permanent errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from tidepool_runner.backend import BackendUnavailableError, SandboxFailedError
from tidepool_runner.container_config import ORGANIZATION_LABEL, RUNNER_HOME_LABEL, SANDBOX_LABEL
from tidepool_runner.owners import ClaimedOwners
from tidepool_runtime.image_refs import parse_reference
from tidepool_runtime.registry_mirrors import (
    Mirror,
    PullFailedError,
    local_tag,
    mirrored_references,
    pull_through_mirrors,
)

# aiodocker reports "cannot reach the engine" as this pseudo status.
ENGINE_UNREACHABLE_STATUS = 900
TRANSIENT_STATUSES = frozenset({ENGINE_UNREACHABLE_STATUS, 502, 503, 504})
LOG_TAIL_LINES = 20
REMOVE_BUSY_SECONDS = 30.0


class EngineUnavailableError(BackendUnavailableError):
    """The engine could not do it now (unreachable, overloaded): the job should be retried."""


def is_transient(error: DockerError) -> bool:
    return error.status in TRANSIENT_STATUSES


@dataclass(frozen=True)
class ContainerSummary:
    container_id: str
    state: str  # created | running | paused | exited | ...
    labels: dict[str, str]


CFS_PERIOD_MICROSECONDS = 100_000  # what the engine uses for NanoCpus


@dataclass(frozen=True)
class ContainerStatus:
    container_id: str
    running: bool
    paused: bool
    status: str
    exit_code: int
    # The container's writable layer (overlay upper and work dirs), where its disk is attached.
    upper_dir: str = ""
    work_dir: str = ""
    # The image's layers under it (overlay lower dirs, topmost first).
    lower_dirs: tuple[str, ...] = ()
    # The limits the container was created with (a live update, see update_resources, is not kept by the
    # engine across a restart: the runner applies the sandbox's own after every start).
    nano_cpus: int = 0
    memory_bytes: int = 0
    pids_limit: int = 0  # 0: none
    # The container's IP addresses on its networks (IPv4 and global IPv6), once it is initialized or running.
    addresses: tuple[str, ...] = ()
    pid: int = 0  # the container's first process on the host (0: not running)


def _addresses(network_settings: dict[str, Any]) -> tuple[str, ...]:
    found: list[str] = []
    for endpoint in (network_settings.get("Networks") or {}).values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            address = (endpoint or {}).get(key)
            if address and address not in found:
                found.append(str(address))
    return tuple(found)


@dataclass(frozen=True)
class RootIds:
    """The host uid and gid that the container's root maps to (its user namespace's first ids)."""

    uid: int
    gid: int


class ContainerEngine:
    def __init__(
        self,
        docker: aiodocker.Docker,
        registry_auth: Callable[[str], dict[str, str] | None] | None = None,
        home: str = "",
        owners: ClaimedOwners | None = None,
        mirrors: Mapping[str, Sequence[Mirror]] | None = None,
    ) -> None:
        """`home`: list only the sandbox containers labelled with this runner home (RUNNER_HOME_LABEL).
        `owners`: claimed warm-pool sandboxes' organizations, reported instead of the container's label.
        `mirrors`: registry mirrors anonymous pulls go through (tidepool_runtime.registry_mirrors)."""
        self._mirrors = mirrors or {}
        self._docker = docker
        self._home = home
        self._owners = owners
        # The login an image's registry needs (the platform's internal one), by image reference.
        self._registry_auth = registry_auth
        # Images seen present: a create of the same snapshot skips the inspect (one engine call less per
        # create, which matters when many start at once). Forgotten when a create finds one gone.
        self._present_images: set[str] = set()

    async def close(self) -> None:
        await self._docker.close()

    async def version(self) -> dict[str, Any]:
        """The engine's version: it answers on its socket (readiness, tidepool_runtime.health)."""
        return dict(await self._docker.version())

    async def inspect(self, name_or_id: str) -> ContainerStatus | None:
        try:
            container = await self._docker.containers.get(name_or_id)
        except DockerError as error:
            if error.status == 404:
                return None
            raise self._translate(error, "inspect the sandbox container") from error
        state: dict[str, Any] = container["State"]
        layer: dict[str, Any] = (container._container.get("GraphDriver") or {}).get("Data") or {}
        host_config: dict[str, Any] = container._container.get("HostConfig") or {}
        return ContainerStatus(
            container_id=container.id,
            running=bool(state.get("Running")),
            paused=bool(state.get("Paused")),
            status=str(state.get("Status", "")),
            exit_code=int(state.get("ExitCode") or 0),
            upper_dir=str(layer.get("UpperDir") or ""),
            work_dir=str(layer.get("WorkDir") or ""),
            lower_dirs=tuple(part for part in str(layer.get("LowerDir") or "").split(":") if part),
            nano_cpus=int(host_config.get("NanoCpus") or 0),
            memory_bytes=int(host_config.get("Memory") or 0),
            pids_limit=max(0, int(host_config.get("PidsLimit") or 0)),
            addresses=_addresses(container._container.get("NetworkSettings") or {}),
            pid=int(state.get("Pid") or 0),
        )

    async def root_ids(self, container_id: str) -> RootIds:
        """Where the container's root maps to on the host. Podman's own inspect has the id mappings (the
        Docker-compatible one does not); a container without a user namespace is refused, since its root
        would be the host's root."""
        try:
            raw = await self._docker._query_json(
                f"v4.0.0/libpod/containers/{container_id}/json", versioned_api=False
            )
        except DockerError as error:
            raise self._translate(error, "inspect the sandbox's user namespace") from error
        mappings: dict[str, Any] = (raw.get("HostConfig") or {}).get("IDMappings") or {}
        try:
            uid = _first_host_id(mappings.get("UidMap") or [])
            gid = _first_host_id(mappings.get("GidMap") or [])
        except ValueError as error:
            raise SandboxFailedError(f"the sandbox has no private user namespace: {error}") from None
        return RootIds(uid=uid, gid=gid)

    async def ensure_image(self, image_ref: str) -> None:
        """Use the local image, else pull it once; a failing pull means the image can't be had."""
        if image_ref in self._present_images:
            return
        try:
            await self._docker.images.inspect(image_ref)
            self._present_images.add(image_ref)
            return
        except DockerError as error:
            if error.status != 404:
                raise self._translate(error, f"inspect image {image_ref}") from error
        auth = self._registry_auth(image_ref) if self._registry_auth else None
        try:
            if auth is None and await self._pull_through_mirrors(image_ref):
                self._present_images.add(image_ref)
                return
            await self._docker.images.pull(image_ref, auth=auth)
        except DockerError as error:
            if error.status == ENGINE_UNREACHABLE_STATUS:
                raise EngineUnavailableError(str(error)) from error
            raise SandboxFailedError(f"image {image_ref} not found") from error
        self._present_images.add(image_ref)

    async def _pull_through_mirrors(self, image_ref: str) -> bool:
        """Pull an image of a mirrored registry through its mirrors (then the registry itself) and give it
        its own name locally; False when its registry has no mirror (nothing done)."""
        try:
            reference = parse_reference(image_ref)
        except ValueError:
            return False
        if not mirrored_references(reference, self._mirrors):
            return False

        async def pull(candidate: str) -> None:
            progress = await self._docker.images.pull(candidate)
            for entry in progress if isinstance(progress, list) else [progress]:
                if isinstance(entry, dict) and entry.get("error"):  # in-band, with HTTP 200
                    raise DockerError(500, {"message": str(entry["error"])})

        try:
            pulled = await pull_through_mirrors(reference, self._mirrors, pull)
        except PullFailedError as error:
            raise SandboxFailedError(f"image {image_ref} not found: {error}") from None
        tag = local_tag(reference)
        if pulled != reference.canonical and tag is not None:
            await self._docker.images.tag(pulled, repo=reference.repository, tag=tag)
            if reference.digest is None:
                with contextlib.suppress(DockerError):
                    await self._docker.images.delete(pulled)  # only that name
        return True

    async def create(self, name: str, config: dict[str, Any]) -> str:
        """Create the container and return its id; a concurrent create of the same name yields that one."""
        try:
            container = await self._docker.containers.create(config, name=name)
        except DockerError as error:
            if error.status == 409:
                existing = await self.inspect(name)
                if existing is not None:
                    return existing.container_id
            if error.status == 404:
                image = str(config.get("Image"))
                if image in self._present_images:
                    # Removed since we saw it: retried (redelivery), and ensure_image pulls it again.
                    self._present_images.discard(image)
                    raise EngineUnavailableError(f"image {image} was removed; pulling it again") from error
                raise SandboxFailedError(f"image {image} not found") from error
            raise self._translate(error, "create the sandbox container") from error
        return container.id

    async def initialize(self, container_id: str) -> None:
        """Set the created container up without running it (Podman's `init`): its network, and so its
        addresses, exist before its first process runs, so a per-sandbox firewall policy can be in place
        first. Already initialized or running: nothing to do."""
        try:
            async with self._docker._query(
                f"v4.0.0/libpod/containers/{container_id}/init", method="POST", versioned_api=False
            ) as response:
                await response.read()
        except DockerError as error:
            if error.status == 304:
                return
            raise self._translate(error, "initialize the sandbox container") from error

    async def start(self, container_id: str) -> None:
        try:
            await self._docker.containers.container(container_id).start()
        except DockerError as error:
            if error.status == 304:  # already started
                return
            raise self._translate(error, "start the sandbox container") from error

    async def update_resources(self, container_id: str, cpu: int, memory_bytes: int) -> None:
        """Change a running container's cpu (cores, as a CFS quota) and memory (bytes, no swap on top) live.
        Podman's own endpoint: its Docker-compatible one has no `update` (Podman 4.3). Raises
        SandboxFailedError when the engine refuses (e.g. memory below what the sandbox uses)."""
        body = {
            "cpu": {"quota": cpu * CFS_PERIOD_MICROSECONDS, "period": CFS_PERIOD_MICROSECONDS},
            "memory": {"limit": memory_bytes, "swap": memory_bytes},
        }
        try:
            async with self._docker._query(
                f"v4.0.0/libpod/containers/{container_id}/update",
                method="POST",
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
                versioned_api=False,
            ) as response:
                await response.read()  # the container's id, as text
        except DockerError as error:
            if error.status in (400, 409, 500):
                raise SandboxFailedError(f"the engine refused the new resources: {error.message}") from error
            raise self._translate(error, "resize the sandbox container") from error

    async def commit(self, container_id: str, repository: str, tag: str) -> str:
        """Commit the container's filesystem (its writable layer on the image's) to `repository:tag`
        (the caller pauses a running container). Returns the image reference."""
        params = {"container": container_id, "repo": repository, "tag": tag, "pause": "false"}
        try:
            # A JSON body is required: Podman's compat endpoint decodes one (an empty body is "EOF").
            async with self._docker._query(
                "commit",
                method="POST",
                params=params,
                data="{}",
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
        except DockerError as error:
            raise self._translate(error, "commit the sandbox's filesystem") from error
        return f"{repository}:{tag}"

    async def push(self, local_ref: str, repository: str, tag: str) -> str:
        """Tag `local_ref` as `repository:tag` and push it (the platform registry's login, if any)."""
        target = f"{repository}:{tag}"
        auth = self._registry_auth(target) if self._registry_auth else None
        try:
            await self._docker.images.tag(local_ref, repo=repository, tag=tag)
            progress = await self._docker.images.push(repository, tag=tag, auth=auth or {})
        except DockerError as error:
            raise self._translate(error, f"push {target}") from error
        for entry in progress if isinstance(progress, list) else [progress]:
            if isinstance(entry, dict) and entry.get("error"):
                raise SandboxFailedError(f"cannot push {target}: {entry['error']}")
        return target

    async def image_size(self, image_ref: str) -> int | None:
        try:
            return int((await self._docker.images.inspect(image_ref)).get("Size") or 0)
        except DockerError:
            return None

    async def remove_image(self, image_ref: str) -> None:
        """Untag (and delete when unused) an image this runner made; missing or in use is fine."""
        self._present_images.discard(image_ref)
        try:
            await self._docker.images.delete(image_ref)
        except DockerError:
            return

    async def pause(self, container_id: str) -> None:
        try:
            await self._docker.containers.container(container_id).pause()
        except DockerError as error:
            raise self._translate(error, "pause the sandbox container") from error

    async def unpause(self, container_id: str) -> None:
        try:
            await self._docker.containers.container(container_id).unpause()
        except DockerError as error:
            raise self._translate(error, "unpause the sandbox container") from error

    async def stop(self, container_id: str, *, timeout_seconds: int) -> None:
        try:
            await self._docker.containers.container(container_id).stop(t=timeout_seconds)
        except DockerError as error:
            if error.status == 304:  # already stopped
                return
            raise self._translate(error, "stop the sandbox container") from error

    async def kill(self, container_id: str) -> None:
        try:
            await self._docker.containers.container(container_id).kill()
        except DockerError as error:
            # 409: not running (any more), which is what a kill wants anyway.
            if error.status in (304, 409):
                return
            raise self._translate(error, "kill the sandbox container") from error

    async def signal(self, container_id: str, signal_name: str) -> None:
        """Send `signal_name` (e.g. "SIGUSR1") to the container's init process, which forwards it to its
        child (the sandbox's daemon supervisor). Raises SandboxFailedError if the container is not running."""
        try:
            await self._docker.containers.container(container_id).kill(signal=signal_name)
        except DockerError as error:
            raise self._translate(error, f"send {signal_name} to the sandbox container") from error

    async def remove(self, name_or_id: str) -> None:
        """Remove the container and its anonymous volumes; an already missing container is fine.

        Podman sometimes still holds a just-killed container's mounts (`userdata/shm: device or resource
        busy`, seen under load): that is retried for up to REMOVE_BUSY_SECONDS before it is an error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REMOVE_BUSY_SECONDS
        delay = 0.1
        while True:
            try:
                await self._docker.containers.container(name_or_id).delete(force=True, v=True)
                return
            except DockerError as error:
                if error.status == 404:
                    return
                busy = "device or resource busy" in str(error.message)
                if not busy or loop.time() + delay > deadline:
                    raise self._translate(error, "remove the sandbox container") from error
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def process_count(self, container_id: str) -> int | None:
        """How many processes (and threads) the container's pids cgroup holds now, or None if the engine
        cannot say (`GET /containers/{id}/stats?stream=false`, `pids_stats.current`)."""
        try:
            answers = await self._docker.containers.container(container_id).stats(stream=False)
        except DockerError:
            return None
        stats = answers[0] if isinstance(answers, list) and answers else answers
        current = (stats.get("pids_stats") or {}).get("current") if isinstance(stats, dict) else None
        return current if isinstance(current, int) else None

    async def log_tail(self, container_id: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            chunks = await self._docker.containers.container(container_id).log(
                stdout=True, stderr=True, tail=lines
            )
        except DockerError:
            return ""
        return "".join(chunks).strip()

    async def ensure_network(self, config: dict[str, Any]) -> dict[str, Any]:
        """Create the network `config["Name"]` (a `POST /networks/create` body) unless it exists; either way
        return its inspect document. Raises EngineUnavailableError (retry) or SandboxFailedError."""
        name = config["Name"]
        try:
            return dict(await (await self._docker.networks.get(name)).show())
        except DockerError as error:
            if error.status != 404:
                raise self._translate(error, f"inspect network {name}") from error
        try:
            await self._docker.networks.create(config)
        except DockerError as error:
            if error.status != 409:  # 409: created meanwhile by another runner on this engine
                raise self._translate(error, f"create network {name}") from error
        try:
            return dict(await (await self._docker.networks.get(name)).show())
        except DockerError as error:
            raise self._translate(error, f"inspect network {name}") from error

    async def list_sandboxes(self) -> list[ContainerSummary]:
        try:
            labels = [SANDBOX_LABEL] + ([f"{RUNNER_HOME_LABEL}={self._home}"] if self._home else [])
            containers = await self._docker.containers.list(all=True, filters=json.dumps({"label": labels}))
        except DockerError as error:
            raise self._translate(error, "list sandbox containers") from error
        summaries: list[ContainerSummary] = []
        for container in containers:
            raw: dict[str, Any] = container._container
            labels = dict(raw.get("Labels") or {})
            if self._owners is not None and SANDBOX_LABEL in labels:
                labels[ORGANIZATION_LABEL] = self._owners.owner(
                    labels[SANDBOX_LABEL], labels.get(ORGANIZATION_LABEL, "")
                )
            summaries.append(
                ContainerSummary(container_id=container.id, state=str(raw.get("State", "")), labels=labels)
            )
        return summaries

    @staticmethod
    def _translate(error: DockerError, doing: str) -> Exception:
        if is_transient(error):
            return EngineUnavailableError(f"cannot {doing}: {error.message}")
        return SandboxFailedError(f"cannot {doing}: {error.message}")


def _first_host_id(mapping: list[str]) -> int:
    """`["0:268435456:65536", ...]` → 268435456: the host id of id 0 inside; never the host's root."""
    for entry in mapping:
        inside, outside, _size = (int(part) for part in entry.split(":"))
        if inside == 0:
            if outside == 0:
                raise ValueError("its root is the host's root")
            return outside
    raise ValueError(f"no mapping for root in {mapping}")
