"""`rclone serve s3 --auth-proxy` program: maps an access key to its secret and its organization's root.

rclone runs it with the request's access key ID as JSON on stdin and caches the answer for 5 minutes.
Unknown, malformed and expired keys get an empty secret, which makes rclone refuse the request.

Two kinds of storage sit behind the gateway (tidepool_stack.s3_gateway):
- a local directory (the embedded default): each organization's root is `{objects}/orgs/{org}`;
- an external S3 (`TIDEPOOL_S3_BACKEND_*`): each organization's root is
  `{backend bucket}/{backend prefix}orgs/{org}`, reached with the backend's own key pair, which only this
  program and the gateway process hold: tenants and services get organization-scoped keys only.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tidepool_runtime.object_keys import parse_key, secret_for

REFUSED = {"type": "local", "_root": "/nonexistent", "_secret_access_key": ""}
# The served bucket must exist as a directory under an organization's root; on S3 a directory exists only
# while an object lies under it, so an empty marker object keeps it (a zero-length `dir/` key would be read
# as a file by some servers).
BUCKET_MARKER = ".tidepool-bucket"


@dataclass(frozen=True)
class Backend:
    """An external S3 that the gateway stores into (never handed to tenants or services)."""

    endpoint: str  # http(s)://host[:port]
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    prefix: str = ""  # inside the bucket, e.g. "tidepool/"; organizations go under `{prefix}orgs/`
    ca_file: str = ""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Backend | None:
        endpoint = environ.get("TIDEPOOL_S3_BACKEND_ENDPOINT", "")
        if not endpoint:
            return None
        prefix = environ.get("TIDEPOOL_S3_BACKEND_PREFIX", "").strip("/")
        return cls(
            endpoint=endpoint.rstrip("/"),
            access_key=environ.get("TIDEPOOL_S3_BACKEND_ACCESS_KEY", ""),
            secret_key=environ.get("TIDEPOOL_S3_BACKEND_SECRET_KEY", ""),
            bucket=environ.get("TIDEPOOL_S3_BACKEND_BUCKET", ""),
            region=environ.get("TIDEPOOL_S3_BACKEND_REGION", "") or "us-east-1",
            prefix=f"{prefix}/" if prefix else "",
            ca_file=environ.get("TIDEPOOL_S3_BACKEND_CA_FILE", ""),
        )

    def organization_root(self, organization_id: str) -> str:
        """`{prefix}orgs/{org}`: the key prefix inside the backend bucket."""
        return f"{self.prefix}orgs/{organization_id}"

    def ensure_bucket(self, organization_id: str, bucket: str) -> None:
        """Writes the served bucket's marker under the organization's root, once (idempotent)."""
        import urllib3
        from minio import Minio
        from minio.error import S3Error

        parts = urlsplit(self.endpoint)
        http_client = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED", ca_certs=self.ca_file or None, timeout=urllib3.Timeout(10, 30)
        )
        client = Minio(
            parts.netloc,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=parts.scheme == "https",
            region=self.region,
            http_client=http_client,
        )
        marker = f"{self.organization_root(organization_id)}/{bucket}/{BUCKET_MARKER}"
        try:
            client.stat_object(self.bucket, marker)
        except S3Error as error:
            if error.code not in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                raise
            client.put_object(self.bucket, marker, io.BytesIO(b""), 0)

    def rclone_config(self, organization_id: str) -> dict[str, str]:
        """rclone's `s3` backend options, rooted at the organization's prefix."""
        return {
            "type": "s3",
            "provider": "Other",
            "endpoint": self.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
            "force_path_style": "true",
            # The bucket exists and the gateway's keys need not be allowed to create buckets.
            "no_check_bucket": "true",
            "_root": f"{self.bucket}/{self.organization_root(organization_id)}",
        }


def answer(
    request: dict[str, str],
    master_secret: str,
    objects_dir: Path,
    bucket: str,
    backend: Backend | None = None,
) -> dict[str, str]:
    access_key_id = request.get("user", "")
    scope = parse_key(access_key_id, master_secret)
    if scope is None:  # malformed, expired or not minted by the platform: nothing is created for it
        return REFUSED
    secret = secret_for(master_secret, access_key_id)
    if backend is not None:
        backend.ensure_bucket(scope.organization_id, bucket)
        return {**backend.rclone_config(scope.organization_id), "_secret_access_key": secret}
    root = objects_dir / "orgs" / scope.organization_id
    (root / bucket).mkdir(parents=True, exist_ok=True)  # top-level directories are buckets
    return {"type": "local", "_root": str(root), "_secret_access_key": secret}


def main() -> None:
    request = json.loads(sys.stdin.read() or "{}")
    reply = answer(
        request,
        os.environ.get("TIDEPOOL_S3_SECRET_KEY", ""),
        Path(os.environ.get("TIDEPOOL_S3_OBJECTS_DIR", "/nonexistent")),
        os.environ.get("TIDEPOOL_S3_BUCKET", "tidepool-builds"),
        Backend.from_environment(os.environ),
    )
    json.dump(reply, sys.stdout)


if __name__ == "__main__":
    main()
