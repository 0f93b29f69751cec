"""Tidepool's object-storage gateway in front of an EXTERNAL S3 (`TIDEPOOL_S3_BACKEND_*`), issue #9 item 5.

The external S3 here is a real S3 server of its own (`rclone serve s3` on a directory, plain http, one static
key pair: the "master key" an operator would give). The gateway is started by the launcher's own code
(`Stack.start_object_storage`), exactly as `make up` does with the backend variables set. What must hold:
tenants and services get organization-scoped keys only, objects land under the organization's prefix on the
backend, one organization cannot read another's, expired keys are refused, and the backend's key pair
reaches no service.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio
from minio.error import InvalidResponseError, S3Error

from tests.polling import wait_until
from tidepool_builder.context_store import ContextNotFoundError, context_key, fetch_context, make_client
from tidepool_runtime.object_keys import user_key
from tidepool_runtime.settings import Settings
from tidepool_stack.s3_gateway import rclone_binary
from tidepool_stack.supervisor import Stack, StackConfig, free_port, without_gateway_secrets

ORG_A, ORG_B = "org-a1b2", "org-c3d4"
BACKEND_KEY, BACKEND_SECRET = "EXTMASTERKEY", "ext-master-secret-0123456789"
BACKEND_BUCKET, BACKEND_PREFIX = "company-data", "tidepool"


@dataclass
class ExternalS3:
    endpoint: str
    root: Path  # the directory the external server stores into

    def client(self) -> Minio:
        return Minio(
            self.endpoint.removeprefix("http://"),
            access_key=BACKEND_KEY,
            secret_key=BACKEND_SECRET,
            secure=False,
            region="us-east-1",
        )


@pytest.fixture(scope="module")
def external_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalS3]:
    root = tmp_path_factory.mktemp("external-s3")
    (root / BACKEND_BUCKET).mkdir()
    port = free_port()
    argv = [
        rclone_binary(), "serve", "s3", "--config", "", "--addr", f"127.0.0.1:{port}",
        "--auth-key", f"{BACKEND_KEY},{BACKEND_SECRET}", "--force-path-style=true", str(root),
    ]  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    external = ExternalS3(f"http://127.0.0.1:{port}", root)

    def answers() -> bool:
        try:
            return external.client().bucket_exists(BACKEND_BUCKET)
        except Exception:
            return False

    try:
        wait_until(answers, timeout=15, message="the external S3 did not come up")
        yield external
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
async def gateway(
    external_s3: ExternalS3, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, Settings, dict[str, str]]]:
    data_dir = tmp_path_factory.mktemp("gateway")
    backend_env = {
        "TIDEPOOL_S3_BACKEND_ENDPOINT": external_s3.endpoint,
        "TIDEPOOL_S3_BACKEND_ACCESS_KEY": BACKEND_KEY,
        "TIDEPOOL_S3_BACKEND_SECRET_KEY": BACKEND_SECRET,
        "TIDEPOOL_S3_BACKEND_BUCKET": BACKEND_BUCKET,
        "TIDEPOOL_S3_BACKEND_PREFIX": BACKEND_PREFIX,
    }
    stack = Stack(
        StackConfig(data_dir=data_dir, trust_object_storage_ca=False, extra_env=backend_env),
        sink=lambda service, line: None,
    )
    try:
        env = await stack.start_object_storage()
        settings = Settings(
            data_dir=data_dir,
            s3_endpoint=env["TIDEPOOL_S3_ENDPOINT"],
            s3_secret_key=env["TIDEPOOL_S3_SECRET_KEY"],
            s3_bucket=env["TIDEPOOL_S3_BUCKET"],
            s3_region=env["TIDEPOOL_S3_REGION"],
            s3_ca_file=env["TIDEPOOL_S3_CA_FILE"],
        )
        yield stack, settings, env
    finally:
        await stack.stop()


def user_client(settings: Settings, organization: str, ttl: int = 3600) -> Minio:
    """What `GET /object-storage/push-access` hands an SDK user of `organization`."""
    access_key, secret, _ = user_key(settings.s3_secret_key, organization, ttl)
    return client_with(settings, access_key, secret)


def client_with(settings: Settings, access_key: str, secret: str) -> Minio:
    import urllib3

    http = urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED", ca_certs=settings.s3_ca_file, retries=urllib3.Retry(total=0)
    )
    return Minio(
        settings.s3_endpoint.removeprefix("https://"),
        access_key=access_key,
        secret_key=secret,
        secure=True,
        region=settings.s3_region,
        http_client=http,
    )


def refused(action: object) -> str:
    """Runs `action()`, which must fail; returns the failure's text."""
    with pytest.raises((S3Error, InvalidResponseError)) as caught:
        action()  # type: ignore[operator]
    return str(caught.value)


async def test_uploads_land_under_the_organizations_prefix_on_the_backend(
    gateway: tuple[Stack, Settings, dict[str, str]], external_s3: ExternalS3
) -> None:
    _, settings, _ = gateway
    data = os.urandom(64)
    key = context_key(ORG_A, "h-layout")
    user_client(settings, ORG_A).put_object(settings.s3_bucket, key, io.BytesIO(data), len(data))
    backend_key = f"{BACKEND_PREFIX}/orgs/{ORG_A}/{settings.s3_bucket}/{key}"
    stored = external_s3.client().get_object(BACKEND_BUCKET, backend_key).read()
    assert stored == data
    # The builder reads it back with its own organization-scoped service key.
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("app/x.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    archive_bytes = buffer.getvalue()
    user_client(settings, ORG_A).put_object(
        settings.s3_bucket, context_key(ORG_A, "h-tar"), io.BytesIO(archive_bytes), len(archive_bytes)
    )
    assert await fetch_context(settings, ORG_A, ["h-tar"]) == {"app/x.txt": b"hi"}


async def test_one_organization_cannot_reach_anothers_objects(
    gateway: tuple[Stack, Settings, dict[str, str]],
) -> None:
    _, settings, _ = gateway
    key = context_key(ORG_A, "h-private")
    user_client(settings, ORG_A).put_object(settings.s3_bucket, key, io.BytesIO(b"secret"), 6)
    other = user_client(settings, ORG_B)
    refused(lambda: other.get_object(settings.s3_bucket, key).read())
    assert [item.object_name for item in other.list_objects(settings.s3_bucket, recursive=True)
            if item.object_name and ORG_A in item.object_name] == []  # fmt: skip
    # B writing under A's name lands in B's own root; A's object is untouched.
    other.put_object(settings.s3_bucket, key, io.BytesIO(b"forged"), 6)
    assert user_client(settings, ORG_A).get_object(settings.s3_bucket, key).read() == b"secret"
    with pytest.raises(ContextNotFoundError):
        await fetch_context(settings, ORG_B, ["h-private-missing"])


def test_expired_forged_and_master_keys_are_refused(
    gateway: tuple[Stack, Settings, dict[str, str]], external_s3: ExternalS3
) -> None:
    _, settings, _ = gateway
    bucket = settings.s3_bucket
    expired_id, expired_secret, _ = user_key(settings.s3_secret_key, ORG_A, -5)  # minted, but expired
    expired = client_with(settings, expired_id, expired_secret)
    refused(lambda: expired.put_object(bucket, context_key(ORG_A, "h-exp"), io.BytesIO(b"x"), 1))
    access_key, _, _ = user_key(settings.s3_secret_key, ORG_A, 3600)
    forged = client_with(settings, access_key, "0" * 40)
    refused(lambda: forged.put_object(bucket, context_key(ORG_A, "h-forged"), io.BytesIO(b"x"), 1))
    # A well-formed key the platform never minted (its tag is wrong) creates nothing on the backend.
    body, _ = user_key(settings.s3_secret_key, "org-forged", 3600)[0].rsplit(".", 1)
    tagless = client_with(settings, f"{body}.{'0' * 20}", "0" * 40)
    refused(lambda: tagless.put_object(bucket, "org-forged/x/context.tar", io.BytesIO(b"x"), 1))
    assert not list(
        external_s3.client().list_objects(BACKEND_BUCKET, prefix=f"{BACKEND_PREFIX}/orgs/org-forged")
    )
    # The backend's own key pair opens nothing through the gateway either.
    master = client_with(settings, BACKEND_KEY, BACKEND_SECRET)
    refused(lambda: master.put_object(bucket, context_key(ORG_A, "h-master"), io.BytesIO(b"x"), 1))


def test_the_backend_key_pair_reaches_no_service(gateway: tuple[Stack, Settings, dict[str, str]]) -> None:
    _, settings, env = gateway
    assert BACKEND_SECRET not in env.values() and BACKEND_KEY not in env.values()
    assert not [name for name in env if name.startswith("TIDEPOOL_S3_BACKEND_")]
    leaked = {**os.environ, "TIDEPOOL_S3_BACKEND_SECRET_KEY": BACKEND_SECRET, "TIDEPOOL_X": "1"}
    assert without_gateway_secrets(leaked).get("TIDEPOOL_S3_BACKEND_SECRET_KEY") is None
    assert without_gateway_secrets(leaked)["TIDEPOOL_X"] == "1"
    # What a tenant gets is derived from the gateway's master secret, never the backend's secret.
    access_key, secret, _ = user_key(settings.s3_secret_key, ORG_A, 3600)
    assert secret != BACKEND_SECRET and BACKEND_KEY not in access_key
    assert make_client(settings, ORG_A)._provider.retrieve().secret_key != BACKEND_SECRET


async def test_half_configured_backend_is_refused(tmp_path: Path) -> None:
    stack = Stack(
        StackConfig(
            data_dir=tmp_path,
            trust_object_storage_ca=False,
            extra_env={"TIDEPOOL_S3_BACKEND_ENDPOINT": "http://127.0.0.1:1"},
        ),
        sink=lambda service, line: None,
    )
    try:
        with pytest.raises(ValueError, match="TIDEPOOL_S3_BACKEND_ACCESS_KEY"):
            await stack.start_object_storage()
    finally:
        await stack.stop()


def test_the_official_sdk_uploads_through_the_gateway(
    gateway: tuple[Stack, Settings, dict[str, str]], external_s3: ExternalS3, tmp_path: Path
) -> None:
    from tests.unit.test_object_storage_embedded import ORG, can_replace_system_store, run_sdk_upload

    stack, settings, _ = gateway
    if not can_replace_system_store():
        pytest.fail("needs unshare -m (root) to give the SDK the gateway's CA as its system trust store")
    source = tmp_path / "hello.txt"
    source.write_bytes(b"through the gateway " + os.urandom(8).hex().encode())
    output = run_sdk_upload(settings, [str(source)], dict(os.environ), stack.client_ca_bundle)
    [context_hash] = json.loads(output)
    backend_key = f"{BACKEND_PREFIX}/orgs/{ORG}/{settings.s3_bucket}/{context_key(ORG, context_hash)}"
    assert external_s3.client().stat_object(BACKEND_BUCKET, backend_key).size
