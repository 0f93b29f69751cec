"""Declarative-build context through the official SDK's own upload path, against the full stack's embedded
object storage (`rclone serve s3` over TLS), then back through the builder's `fetch_context`.

Trusting the private CA: the SDK builds its obstore client inside `isolated_env()` (os.environ emptied), so
no environment variable (SSL_CERT_FILE, AWS_CA_BUNDLE, ...) reaches it; only the system trust store does.
The SDK therefore runs in a child process, in a private mount namespace whose system CA bundle is the
stack's `client_ca_bundle` (host CAs + ours): what a user gets after installing the CA with
`update-ca-certificates`, without changing this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.integration.stackthread import StackThread
from tidepool_builder.context_store import context_key, fetch_context, make_client
from tidepool_runtime.object_keys import parse_key, secret_for
from tidepool_runtime.settings import Settings
from tidepool_stack.supervisor import HOST_CA_BUNDLE

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

SDK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from daytona import Daytona, Image
    from daytona._sync.snapshot import SnapshotService

    file_path, dir_path = sys.argv[1], sys.argv[2]
    image = Image.debian_slim("3.12").add_local_file(file_path, "/app/hello.txt")
    image = image.add_local_dir(dir_path, "/app/data")
    daytona = Daytona()  # DAYTONA_API_URL / DAYTONA_API_KEY from the environment
    hashes = SnapshotService.process_image_context(daytona._object_storage_api, image)
    print(json.dumps({"hashes": hashes, "archives": [c.archive_path for c in image._context_list],
                      "dockerfile": image.dockerfile()}))
    """
)


def can_replace_system_store() -> bool:
    if not (shutil.which("unshare") and HOST_CA_BUNDLE.is_file()):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def run_sdk_with_ca_in_system_store(bundle: str, *args: str) -> dict[str, object]:
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    argv = ["unshare", "-m", "sh", "-c", script, "sh", bundle, str(HOST_CA_BUNDLE)]
    result = subprocess.run(
        [*argv, sys.executable, "-c", SDK_SCRIPT, *args],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def storage_settings(stack: StackThread) -> Settings:
    env = stack.stack.env
    return Settings(
        s3_endpoint=env["TIDEPOOL_S3_ENDPOINT"],
        s3_secret_key=env["TIDEPOOL_S3_SECRET_KEY"],
        s3_bucket=env["TIDEPOOL_S3_BUCKET"],
        s3_region=env["TIDEPOOL_S3_REGION"],
        s3_ca_file=env["TIDEPOOL_S3_CA_FILE"],
    )


def test_push_access_points_at_the_embedded_storage(stack: StackThread) -> None:
    response = httpx.get(
        f"{stack.api_url}/object-storage/push-access", headers={"Authorization": f"Bearer {stack.api_key}"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    env = stack.stack.env
    assert body["storageUrl"] == env["TIDEPOOL_S3_ENDPOINT"] and body["storageUrl"].startswith("https://")
    # A key scoped to the caller's organization, never the storage's master secret.
    scope = parse_key(body["accessKey"], env["TIDEPOOL_S3_SECRET_KEY"])
    assert scope is not None and scope.organization_id == body["organizationId"] and not scope.service
    assert body["secret"] == secret_for(env["TIDEPOOL_S3_SECRET_KEY"], body["accessKey"])
    assert body["secret"] != env["TIDEPOOL_S3_SECRET_KEY"]
    assert (body["bucket"], body["region"]) == (env["TIDEPOOL_S3_BUCKET"], env["TIDEPOOL_S3_REGION"])
    # No session token: the key pair alone is the credential (the SDK requires the field, so it is empty).
    assert body["organizationId"] and body["sessionToken"] == ""
    ca = Path(env["TIDEPOOL_S3_CA_FILE"]).read_bytes()
    assert Path(stack.stack.client_ca_bundle).read_bytes().endswith(ca)
    assert httpx.get(f"{stack.api_url}/object-storage/push-access").status_code == 401


@pytest.mark.skipif(not can_replace_system_store(), reason="needs unshare -m (root) to swap the trust store")
def test_sdk_image_context_upload_round_trips(stack: StackThread, tmp_path: Path) -> None:
    hello = tmp_path / "hello.txt"
    hello.write_bytes(b"hello from the sdk " + os.urandom(8).hex().encode())
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    (data / "nested" / "blob.bin").write_bytes(os.urandom(6 * 1024 * 1024))  # two multipart parts
    (data / "readme.md").write_text("# data\n")

    result = run_sdk_with_ca_in_system_store(stack.stack.client_ca_bundle, str(hello), str(data))
    hashes, archives = result["hashes"], result["archives"]
    assert isinstance(hashes, list) and len(hashes) == 2 and all(len(h) == 32 for h in hashes)
    assert archives == [str(hello).lstrip("/"), str(data).lstrip("/")]
    assert f'COPY ["{archives[0]}", "/app/hello.txt"]' in str(result["dockerfile"])

    organization = httpx.get(
        f"{stack.api_url}/object-storage/push-access", headers={"Authorization": f"Bearer {stack.api_key}"}
    ).json()["organizationId"]
    settings = storage_settings(stack)
    client = make_client(settings, organization)
    for context_hash in hashes:
        info = client.stat_object(settings.s3_bucket, context_key(organization, context_hash))
        assert info.size and info.size > 0
    # On disk in the organization's own root: {data_dir}/objects/orgs/{org}/{bucket}/{org}/{hash}/context.tar
    root = stack.data_dir / "objects" / "orgs" / organization
    on_disk = root / settings.s3_bucket / organization / hashes[0] / "context.tar"
    assert on_disk.is_file()

    merged = asyncio.run(fetch_context(settings, organization, hashes))
    assert merged == {
        archives[0]: hello.read_bytes(),
        f"{archives[1]}/nested/blob.bin": (data / "nested" / "blob.bin").read_bytes(),
        f"{archives[1]}/readme.md": b"# data\n",
    }

    # Content-addressed: the same sources give the same hashes, and the upload is skipped (HEAD 200).
    mtime = on_disk.stat().st_mtime_ns
    again = run_sdk_with_ca_in_system_store(stack.stack.client_ca_bundle, str(hello), str(data))
    assert again["hashes"] == hashes
    assert on_disk.stat().st_mtime_ns == mtime
