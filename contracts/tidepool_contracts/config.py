"""Configuration shared by every service: one env prefix (TIDEPOOL_), embedded defaults."""

from __future__ import annotations

import socket
from functools import cached_property
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDEPOOL_", extra="ignore")

    data_dir: Path = REPO_ROOT / ".tidepool"
    nats_url: str = "nats://127.0.0.1:4222"
    # Empty means SQLite under data_dir (the embedded default).
    database_url: str = ""

    api_host: str = "127.0.0.1"
    api_port: int = 3000
    # What clients are told: DAYTONA_API_URL and the toolbox proxy base.
    public_api_url: str = ""
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 4000
    public_proxy_url: str = ""
    # How long POST /sandbox waits for `started` before answering with the current state.
    create_wait_seconds: float = 20.0

    runner_id: str = ""
    runner_host: str = "127.0.0.1"
    runner_port: int = 3003
    runner_public_url: str = ""
    # Shared secret between proxy and runners; never given to users.
    runner_token: str = "tidepool-dev-runner-token"
    runner_region: str = "us"
    docker_host: str = ""
    daemon_dir: Path = REPO_ROOT / "services" / "daemon"
    # CA bundle injected into builds and sandboxes (TLS-intercepting proxies, enterprise CAs).
    ca_bundle: str = ""
    container_nofile: int = 20000
    container_nproc: int = 4096
    # Every sandbox runs in its own user namespace (Podman's `--userns=auto`): its root is an unprivileged
    # host uid range of this size, distinct per sandbox, taken from the `containers` entry of
    # /etc/subuid and /etc/subgid (set up by scripts/setup-host.sh).
    sandbox_userns: str = "auto:size=65536"
    # Container network for sandboxes ("" = the engine's default bridge).
    sandbox_network: str = ""

    default_snapshot: str = "daytona-small"
    default_image: str = "localhost/tidepool/default:0.2.0"
    default_dockerfile: Path = REPO_ROOT / "images" / "default" / "Dockerfile"
    base_image: str = "localhost/tidepool/base:bookworm"

    # Toolbox health checks (runner): every running sandbox's daemon gets `GET /version` this often; after
    # `daemon_health_failures` unanswered checks in a row (each waiting `daemon_health_timeout_seconds`)
    # its worker is restarted, and if it still does not answer within `daemon_restart_wait_seconds` the
    # sandbox is reported `error` (recoverable).
    daemon_health_interval_seconds: float = 10.0
    daemon_health_timeout_seconds: float = 5.0
    daemon_health_failures: int = 3
    daemon_restart_wait_seconds: float = 30.0

    # Scheduler reconciliation: how long a job may stay unanswered before it is re-sent, and how often.
    reconcile_interval_seconds: float = 5.0
    job_resend_after_seconds: float = 45.0
    job_max_attempts: int = 3

    # Object storage (S3) for declarative-build context. Embedded: `rclone serve s3` over TLS (the SDK
    # uploads only over https). `s3_ca_file` is the CA that signed the endpoint's certificate, if private.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "tidepool-builds"
    s3_region: str = "us-east-1"
    s3_ca_file: str = ""
    # Embedded storage: `s3_secret_key` is a master secret from which per-organization keys are derived
    # (tidepool_contracts.object_keys); with an external S3, the static key pair is used as given.
    s3_scoped_keys: bool = False
    # OCI registry that built and pulled snapshots are pushed to, so any runner can pull them on demand
    # ("" = images stay on the engine that built them). Embedded: Debian's docker-registry on loopback.
    registry_url: str = ""

    # Declarative builds are cached by content for this long after their last use.
    build_cache_hours: float = 24.0

    # Encrypts secrets at rest (registry passwords). Empty: generated once under data_dir.
    secret_key: str = ""

    otlp_endpoint: str = ""
    log_level: str = "INFO"
    log_json: bool = False

    @cached_property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'tidepool.db'}"

    @cached_property
    def effective_public_api_url(self) -> str:
        return self.public_api_url or f"http://localhost:{self.api_port}/api"

    @cached_property
    def toolbox_proxy_url(self) -> str:
        base = self.public_proxy_url or f"http://localhost:{self.proxy_port}"
        return f"{base.rstrip('/')}/toolbox"

    @cached_property
    def effective_runner_id(self) -> str:
        return self.runner_id or f"runner-{socket.gethostname()}"

    @cached_property
    def effective_runner_url(self) -> str:
        return self.runner_public_url or f"http://{self.runner_host}:{self.runner_port}"

    @cached_property
    def effective_docker_host(self) -> str:
        if self.docker_host:
            return self.docker_host
        return f"unix://{self.data_dir / 'podman.sock'}"

    @property
    def runtime_dir(self) -> Path:
        """The runner's private tmpfs: what it shares with sandboxes (daemon, CA bundle, socket folders)."""
        return self.data_dir / "run"

    @property
    def sockets_dir(self) -> Path:
        return self.runtime_dir / "sockets"

    @property
    def disks_dir(self) -> Path:
        """Each sandbox's disk: a sparse ext4 image holding its writable layer."""
        return self.data_dir / "disks"


def load_settings() -> Settings:
    return Settings()
