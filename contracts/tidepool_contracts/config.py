"""Configuration shared by every service: one env prefix (TIDEPOOL_), embedded defaults."""

from __future__ import annotations

import json
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDEPOOL_", extra="ignore", use_attribute_docstrings=True)

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
    # OCI runtime for sandboxes, by the name the engine knows it under ("" = the engine's default, runc
    # here). Set e.g. "runsc" (gVisor) or "kata" after registering it with the engine (see the README).
    sandbox_runtime: str = ""
    sandbox_seccomp_profile: str = ""
    """Seccomp profile for sandboxes: path to a JSON profile in Docker's format, read by the runner at start
    and handed to the engine from its runtime folder. Empty: the shipped profile
    (services/runner/tidepool_runner/sandbox-seccomp.json: the engine's default minus creating namespaces:
    no `unshare -Ur` inside a sandbox). `unconfined` is refused: a sandbox always runs filtered."""

    # Sandbox networking. The runner creates the network at start when missing and keeps its host firewall
    # (tidepool_runner.firewall) keyed on the bridge: no sandbox reaches the host, another sandbox, link-local
    # (cloud metadata) or private addresses; DNS to the sandbox resolvers and the internet are allowed.
    sandbox_network: str = "tidepool-sandboxes"
    """Engine network every sandbox joins (not with `networkBlockAll`, which gets no network at all)."""
    sandbox_network_subnet: str = "10.90.0.0/16"
    """IPv4 subnet of `sandbox_network`, used when the runner creates it. To change the subnet or bridge of
    an existing network, remove the network (`podman network rm`) while no sandbox uses it."""
    sandbox_network_bridge: str = "tidepool0"
    """Linux bridge of `sandbox_network` (at most 15 characters); the firewall matches on it."""
    sandbox_firewall: bool = True
    """Let the runner manage the sandbox firewall (needs root / CAP_NET_ADMIN in the host's network
    namespace and iptables). Off only if you isolate sandboxes yourself: they then reach the host, each
    other and the cloud metadata service."""
    sandbox_allow_inter_sandbox: bool = False
    """Widen on purpose: let sandboxes on this runner open connections to each other over the bridge."""
    sandbox_allowed_cidrs: Annotated[list[str], NoDecode] = []
    """Widen on purpose: destinations sandboxes may reach although private or on the host, e.g.
    `10.1.2.0/24,fd00:1::/64` (comma-separated or a JSON list; IPv4 and IPv6)."""
    sandbox_dns_servers: Annotated[list[str], NoDecode] = []
    """DNS servers given to sandboxes (comma-separated or a JSON list); sandboxes reach them on port 53 even
    when they are private. Empty: the engine's default, the host's resolv.conf nameservers."""

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
    # Its login (htpasswd, bcrypt): only the builder (push) and the runners (pull) are given it.
    registry_username: str = ""
    registry_password: str = ""
    # Registries on the platform's own host (loopback, its addresses and names) are refused as image
    # sources, so no tenant reaches the host's ports through a pull; an operator lists exceptions here,
    # as `host:port` (JSON list in the environment: TIDEPOOL_ALLOWED_HOST_REGISTRIES='["vm:5000"]').
    allowed_host_registries: list[str] = []

    # Declarative builds are cached by content for this long after their last use.
    build_cache_hours: float = 24.0

    # Encrypts secrets at rest (registry passwords). Empty: generated once under data_dir.
    secret_key: str = ""

    otlp_endpoint: str = ""
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("sandbox_allowed_cidrs", "sandbox_dns_servers", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Environment variables hold lists as `a,b` or as JSON (`["a", "b"]`)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

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
