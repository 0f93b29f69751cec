"""Build jobs from the bus: pull or build the image, stream its log, check it can host a sandbox, report."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import aiodocker
import structlog

from tidepool_builder.build_cgroup import CGROUP_ROOT, BuildCgroup, BuildCgroupError
from tidepool_builder.context_hash import HashCheck, check_context_hash
from tidepool_builder.context_store import PERMISSION_BITS, fetch_archives, merge_archives, merge_modes
from tidepool_builder.docker_build import (
    BuildFailedError,
    BuildIsolation,
    build_image,
    image_exists,
    wait_for_sandbox_network,
)
from tidepool_builder.images import (
    ImageUnusableError,
    ensure_build_sources,
    ensure_source_image,
    inspect_image,
    push_to_registry,
)
from tidepool_contracts import channels
from tidepool_contracts.models import (
    BuildJob,
    BuildLogLine,
    RegistryCredentialsReply,
    RegistryCredentialsRequest,
    SnapshotEvent,
    SnapshotState,
)
from tidepool_contracts.subjects import kv_safe
from tidepool_runtime import sealing
from tidepool_runtime.broker import Bus, Msg, keep_in_progress
from tidepool_runtime.image_refs import (
    ReferenceRefusedError,
    check_reference,
    dockerfile_image_references,
    registry_host,
)
from tidepool_runtime.isolation import SandboxNetworkError

# The builder reads only its own concerns (runtime settings.py); `Settings` here means those.
from tidepool_runtime.settings import BuilderSettings as Settings

log = structlog.get_logger("tidepool.builder")

# A build interrupted this many times (builder crashes) is reported failed instead of retried again.
MAX_BUILD_DELIVERIES = 4


class ContextHashMismatchError(Exception):
    """An uploaded context does not hold the content its hash names."""


class SourceRefusedError(Exception):
    """The job names an image its organization may not use (the API refuses these already)."""


def read_context(context_dir: str | None) -> dict[str, bytes]:
    """Files next to the Dockerfile become the build context (the Dockerfile itself is passed separately)."""
    if not context_dir:
        return {}
    root = Path(context_dir)
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "Dockerfile"
    }


def read_context_modes(context_dir: str | None) -> dict[str, int]:
    """The permission bits of read_context()'s files (path -> mode), which COPY keeps."""
    if not context_dir:
        return {}
    root = Path(context_dir)
    return {
        str(path.relative_to(root)): path.stat().st_mode & PERMISSION_BITS
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "Dockerfile"
    }


class Builder:
    def __init__(self, settings: Settings, bus: Bus, docker: aiodocker.Docker) -> None:
        self.settings = settings
        self.bus = bus
        self.docker = docker
        # How RUN steps are confined; a setting that can't confine them stops the builder here (ValueError).
        self.isolation = BuildIsolation.from_settings(settings)
        # Source pulls run one at a time: a name pulled with one organization's credentials is removed
        # again before another job can look for it (images.ensure_source_image).
        self.source_lock = asyncio.Lock()
        seal_key = sealing.load_seal_key(
            settings.registry_seal_key, settings.data_dir, sealing.REGISTRY_CREDENTIALS
        )
        self.registry_sealer = sealing.Sealer(seal_key, sealing.REGISTRY_CREDENTIALS)

    def registry_auth(self) -> dict[str, str] | None:
        """The internal registry's login (X-Registry-Auth), when it has one."""
        settings = self.settings
        if not settings.registry_username:
            return None
        return {
            "username": settings.registry_username,
            "password": settings.registry_password,
            "serveraddress": registry_host(settings.registry_url),
        }

    def check_sources(self, job: BuildJob) -> None:
        """Defence in depth behind the API: an organization's job reads only images it may use."""
        if not job.organization_id:
            return  # the platform's own image
        sources = [job.source_image] if job.source_image else []
        if job.dockerfile:
            try:
                sources += dockerfile_image_references(job.dockerfile)
            except ValueError as error:
                raise SourceRefusedError(f"Dockerfile: {error}") from error
        for source in sources:
            try:
                check_reference(
                    source,
                    job.organization_id,
                    internal_registry=self.settings.registry_url,
                    platform_images=(self.settings.default_image, self.settings.base_image),
                    allowed_host_registries=self.settings.allowed_host_registries,
                )
            except ReferenceRefusedError as error:
                raise SourceRefusedError(error.message) from error

    async def fetch_verified_context(self, job: BuildJob) -> tuple[dict[str, bytes], dict[str, int]]:
        """The job's uploaded context, each archive checked against the SDK hash it was requested by:
        (path -> content, path -> permission bits)."""
        archives = await fetch_archives(self.settings, job.organization_id or "", job.context_hashes)
        for context_hash, archive in zip(job.context_hashes, archives, strict=True):
            verdict = await asyncio.to_thread(check_context_hash, archive, context_hash)
            if verdict == HashCheck.MISMATCH:
                raise ContextHashMismatchError(
                    f"build context {context_hash} does not match its hash: the uploaded archive holds "
                    "other content than the hash names; nothing was built or cached from it"
                )
            if verdict == HashCheck.UNDECIDED:
                await self.log_line(
                    job,
                    f"Context {context_hash}: a directory whose listing order the archive does not keep; "
                    "its hash could not be recomputed\n",
                )
        return merge_archives(archives), merge_modes(archives)

    async def report(
        self, job: BuildJob, state: SnapshotState, reason: str | None = None, ready: bool = False
    ) -> None:
        facts = await inspect_image(self.docker, job.image_ref) if ready else None
        registry_ref = await self.publish_image(job) if ready else None
        event = SnapshotEvent(
            snapshot_id=job.snapshot_id,
            snapshot_name=job.snapshot_name,
            image_ref=job.image_ref,
            state=state,
            error_reason=reason,
            entrypoint=facts.entrypoint if facts else None,
            size_bytes=facts.size_bytes if facts else None,
            registry_ref=registry_ref,
        )
        await self.bus.publish(channels.SNAPSHOT_EVENTS, event, snapshot=kv_safe(job.snapshot_name))

    async def pull_credentials(self, job: BuildJob) -> dict[str, str] | None:
        """Ask the API for the organization's registry credentials (request/reply: nothing persisted)."""
        if not job.organization_id or not job.source_image:
            return None
        request = RegistryCredentialsRequest(organization_id=job.organization_id, image=job.source_image)
        try:
            credentials = await self.bus.request(channels.REGISTRY_CREDENTIALS, request, timeout=5)
        except Exception as error:  # no API answering: try anonymously
            log.warning("registry.credentials_unavailable", error=str(error))
            return None
        assert isinstance(credentials, RegistryCredentialsReply)
        if not credentials.found:
            return None
        try:  # sealed by the API for the builder only
            password = self.registry_sealer.open(credentials.password)
        except ValueError:
            log.warning("registry.credentials_unsealed", organization_id=job.organization_id)
            return None
        return {
            "username": credentials.username,
            "password": password,
            "serveraddress": credentials.server_address,
        }

    async def publish_image(self, job: BuildJob) -> str | None:
        """Push to the platform registry; without one (or if it fails) the image stays on this engine."""
        if not self.settings.registry_url:
            return None
        try:
            return await push_to_registry(
                self.docker, self.settings.registry_url, job.image_ref, self.registry_auth()
            )
        except aiodocker.DockerError as error:
            log.warning("registry.push_failed", image=job.image_ref, error=error.message)
            return None

    async def log_line(self, job: BuildJob, text: str, done: bool = False) -> None:
        line = BuildLogLine(image_ref=job.image_ref, text=text, done=done)
        await self.bus.publish(channels.BUILD_LOG_LINES, line, image=kv_safe(job.image_ref))

    async def handle(self, job: BuildJob, msg: Msg) -> None:
        heartbeat = asyncio.create_task(keep_in_progress(msg))
        try:
            await self.produce(job, msg)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def evict(self, job: BuildJob) -> None:
        """Drop an expired cached build; a later identical request builds it again."""
        for reference in filter(None, (job.image_ref, job.registry_ref)):
            with contextlib.suppress(aiodocker.DockerError):
                await self.docker.images.delete(reference, force=True)
        log.info("build.evicted", image=job.image_ref)

    async def produce(self, job: BuildJob, msg: Msg) -> None:
        if job.remove:
            await self.evict(job)
            return
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        try:
            self.check_sources(job)
        except SourceRefusedError as error:
            state = SnapshotState.ERROR if job.source_image else SnapshotState.BUILD_FAILED
            await self.report(job, state, str(error))
            return
        if job.source_image:
            await self.report(job, SnapshotState.PULLING)
            try:
                auth = await self.pull_credentials(job)
                async with self.source_lock:
                    await ensure_source_image(
                        self.docker, job.source_image, job.image_ref, auth, self.settings.mirrors
                    )
            except ImageUnusableError as error:
                await self.report(job, SnapshotState.ERROR, str(error))
                return
            await self.report(job, SnapshotState.ACTIVE, ready=True)
            return
        if await image_exists(self.docker, job.image_ref):
            # Content-addressed refs: an existing image is exactly this build (the build cache).
            await self.log_line(job, f"Using cached image {job.image_ref}\n")
            await self.log_line(job, "", done=True)
            await self.report(job, SnapshotState.ACTIVE, ready=True)
            return
        if delivered > MAX_BUILD_DELIVERIES:
            await self.fail(job, f"build was interrupted {delivered - 1} times; giving up")
            return
        await self.report(job, SnapshotState.BUILDING)
        if delivered > 1:
            await self.log_line(job, f"Restarting build (attempt {delivered})\n")
        log.info("build.started", image=job.image_ref, attempt=delivered)
        cgroup = BuildCgroup(CGROUP_ROOT, uuid.uuid4().hex)
        try:
            # RUN steps are tenant code: they run only on the firewalled sandbox network.
            await wait_for_sandbox_network(self.docker, self.settings)
            cgroup_parent = await self.bounded_cgroup(cgroup)
            await self.pull_mirrored_sources(job)
            context, modes = read_context(job.context_dir), read_context_modes(job.context_dir)
            if job.context_hashes:
                uploaded, uploaded_modes = await self.fetch_verified_context(job)
                context |= uploaded
                modes |= uploaded_modes
            await build_image(
                self.docker,
                dockerfile=job.dockerfile,
                context_files=context,
                context_modes=modes,
                tag=job.image_ref,
                ca_bundle_path=self.settings.ca_bundle or None,
                on_log=lambda line: self.log_line(job, line + "\n"),
                organization_id=job.organization_id,
                isolation=self.isolation,
                cgroup_parent=cgroup_parent,
            )
        except (BuildFailedError, ImageUnusableError, ContextHashMismatchError, SandboxNetworkError) as error:
            await self.fail(job, str(error))
            return
        except Exception as error:  # context download, engine errors: a failed build, not a stuck one
            log.exception("build.crashed", image=job.image_ref)
            await self.fail(job, f"build failed: {error}")
            return
        finally:
            await asyncio.to_thread(cgroup.remove)
        log.info("build.finished", image=job.image_ref)
        await self.log_line(job, f"Built {job.image_ref}\n", done=True)
        await self.report(job, SnapshotState.ACTIVE, ready=True)

    async def pull_mirrored_sources(self, job: BuildJob) -> None:
        """The Dockerfile's images that come through a registry mirror, pulled before the build (which then
        finds them locally); without mirrors the engine's build pulls what it lacks itself."""
        if not (self.settings.mirrors and job.dockerfile):
            return
        try:
            sources = dockerfile_image_references(job.dockerfile)
        except ValueError:
            return  # a platform Dockerfile with build arguments: the build itself reports what is wrong
        async with self.source_lock:
            await ensure_build_sources(self.docker, sources, self.settings.mirrors)

    async def bounded_cgroup(self, cgroup: BuildCgroup) -> str | None:
        """The build's own cgroup (`pids.max` = `build_pids`) as the build API's `cgroupparent`; None, with a
        warning, where the builder can't make cgroups (e.g. a pod without the host's cgroup filesystem): then
        the build's processes are bounded only by the engine's host limits."""
        try:
            await asyncio.to_thread(cgroup.create, self.settings.build_pids)
        except BuildCgroupError as error:
            log.warning("build.pids_unbounded", error=str(error))
            return None
        return cgroup.step_path

    async def fail(self, job: BuildJob, reason: str) -> None:
        log.error("build.failed", image=job.image_ref, reason=reason)
        await self.log_line(job, f"ERROR: {reason}\n", done=True)
        if await image_exists(self.docker, job.image_ref):
            # A half-good image (e.g. without python3) must not be mistaken for a cached build later.
            with contextlib.suppress(aiodocker.DockerError):
                await self.docker.images.delete(job.image_ref, force=True)
        await self.report(job, SnapshotState.BUILD_FAILED, reason)
