"""Configuration, split by concern: one env prefix (TIDEPOOL_), embedded defaults.

Each service loads only its own class (`ApiSettings`, `RunnerSettings`, …), the concerns it reads; its
Kubernetes Deployment is given exactly those variables.
"""

from __future__ import annotations

import json
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tidepool_runtime import netguard
from tidepool_runtime.registry_mirrors import Mirror, parse_registry_mirrors

REPO_ROOT = Path(__file__).resolve().parents[2]


def _split_list(value: Any) -> Any:
    """Environment variables hold lists as `a,b` or as JSON (`["a", "b"]`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDEPOOL_", extra="ignore", use_attribute_docstrings=True)


class CommonSettings(_Base):
    """What every service reads: where its data and the bus are, logging and tracing."""

    data_dir: Path = REPO_ROOT / ".tidepool"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str = ""
    """This service's NATS login (one user per service, `tidepool_runtime.nats_auth`); empty: none."""
    nats_password: str = ""
    nats_ca_file: str = ""
    """CA that signed the NATS server's certificate, for a `tls://` URL (empty: the system's CAs)."""
    nats_replicas: int = 1
    """Replicas of the streams and KV buckets a service creates: 1 on one machine, 3 on the 3-node JetStream
    cluster of deploy/k8s (every service must be given the same value)."""
    bus_create_streams: bool = True
    """True (one machine): a service creates the streams and KV buckets it uses when missing. False
    (deploy/k8s, where the bus-init Job alone may create them): it only checks they exist, and fails to start
    until they do; its NATS login has no right to create any (`nats_auth.permissions`)."""
    otlp_endpoint: str = ""
    metrics_port: int = 0
    """Prometheus `GET /metrics` of this service on this port (0: none); `make up` gives each service its own
    port from this one on, in the order api, scheduler, builder, runner, proxy, ssh_gateway, telemetry."""
    metrics_host: str = "127.0.0.1"
    tracing_enabled: bool = True
    """False: no spans and no trace context at all (to measure what tracing costs; `make bench`)."""
    log_level: str = "INFO"
    log_json: bool = False
    health_host: str = "0.0.0.0"
    """Address of the service's probe listener (`/healthz`, `/readyz`: tidepool_runtime.health)."""
    health_port: int = 8081
    """Its port; 0: no listener (the one-machine stack). The API answers the probes on its own port."""

    @property
    def nats_login(self) -> dict[str, str]:
        """`create_broker`'s keyword arguments for this service's NATS login."""
        return {"user": self.nats_user, "password": self.nats_password, "ca_file": self.nats_ca_file}


class DatabaseSettings(_Base):
    """The API's database."""

    # Empty means SQLite under data_dir (the embedded default).
    database_url: str = ""

    @cached_property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'tidepool.db'}"


class ApiHttpSettings(_Base):
    """The API's HTTP server and what clients are told."""

    api_host: str = "127.0.0.1"
    api_port: int = 3000
    # Largest request body the API reads (bytes): larger ones get 413 without being read. Uploads go to the
    # toolbox proxy, never through the API, so 1 MiB is ample for JSON (and under NATS's 1 MiB payload).
    api_max_body_bytes: int = 1024 * 1024
    # Largest request line plus headers (bytes): larger ones get 431 before they are buffered further.
    api_max_header_bytes: int = 64 * 1024
    # What clients are told: DAYTONA_API_URL and the toolbox proxy base.
    public_api_url: str = ""
    # How long POST /sandbox waits for `started` before answering with the current state.
    create_wait_seconds: float = 20.0

    @cached_property
    def effective_public_api_url(self) -> str:
        return self.public_api_url or f"http://localhost:{self.api_port}/api"


class PublicProxySettings(_Base):
    """Where users reach the toolbox proxy."""

    proxy_port: int = 4000
    public_proxy_url: str = ""

    # Preview URLs, `{port}` and `{id}` filled in (`{id}`: a sandbox id, or a signed URL's token), e.g.
    # `https://{port}-{id}.preview.example.com`. Default: the proxy's own URL with `{port}-{id}.` before its
    # host, e.g. `http://{port}-{id}.localhost:4000` (`*.localhost` is loopback, no DNS set-up).
    preview_url_template: str = ""

    @cached_property
    def toolbox_proxy_url(self) -> str:
        base = self.public_proxy_url or f"http://localhost:{self.proxy_port}"
        return f"{base.rstrip('/')}/toolbox"

    def preview_url(self, port: int, label: str) -> str:
        template = self.preview_url_template
        if not template:
            scheme, _, rest = (self.public_proxy_url or f"http://localhost:{self.proxy_port}").partition(
                "://"
            )
            template = f"{scheme}://{{port}}-{{id}}.{rest.split('/', 1)[0]}"
        return template.replace("{port}", str(port)).replace("{id}", label)


class PublicSshGatewaySettings(_Base):
    """Where users reach the SSH gateway (`sshCommand` of SSH access)."""

    ssh_gateway_port: int = 2222
    # The host name in `sshCommand`; empty: localhost.
    public_ssh_gateway_host: str = ""

    def ssh_command(self, token: str) -> str:
        host = self.public_ssh_gateway_host or "localhost"
        port = "" if self.ssh_gateway_port == 22 else f"-p {self.ssh_gateway_port} "
        return f"ssh {port}{token}@{host}"


class SshGatewayHostSettings(_Base):
    """The SSH gateway's listening address and host key."""

    ssh_gateway_host: str = "127.0.0.1"
    # Empty: an Ed25519 key generated once under data_dir (`ssh_host_ed25519_key`).
    ssh_gateway_host_key: str = ""


class ProxyHttpSettings(_Base):
    """The proxy's listening address."""

    proxy_host: str = "127.0.0.1"


class RunnerTokenSettings(_Base):
    """Shared secret between proxy and runners."""

    # Shared secret between proxy and runners; never given to users.
    runner_token: str = "tidepool-dev-runner-token"


class RunnerLossSettings(_Base):
    """When the scheduler (and the API's runner routes) count a runner as lost."""

    runner_lost_after_seconds: float = Field(default=20.0, gt=0)
    """A runner whose last heartbeat is older than this (or whose heartbeat entry expired, after 30 s) is
    lost: placement skips it, and its sandboxes go to a recoverable `error` until it is back (checked at
    every reconciliation). Several of its heartbeats (`runner_heartbeat_interval_seconds`) long."""


class RunnerHeartbeatSettings(_Base):
    """How often a runner tells the scheduler it is alive (tidepool_runner.inventory)."""

    runner_heartbeat_interval_seconds: float = Field(default=5.0, gt=0)
    """Well below the scheduler's `runner_lost_after_seconds` and the heartbeat entry's 30 s expiry."""


class ToolboxAdmissionSettings(_Base):
    """Back-pressure on the toolbox path (tidepool_runtime.admission): how many toolbox requests one hop
    relays at once before further ones wait briefly (in a queue as long as the slots) and are then
    refused with 503 and `Retry-After`. WebSockets, log follows and streamed file transfers are exempt.

    Sized from `BENCH_ONLY=backpressure` on 2 cores (busy with other work too): the whole path completes
    150-230 mixed requests/s; at twice that, admitted toolbox requests took p50/p99 0.33/1.9 s with these
    defaults, 0.2/0.7 s with 16 slots held until complete, 0.5/1.6 s with 32 slots held up to 1 s. 16 slots
    with a 0.1 s hold bound what is admitted to ~160 requests/s even when every request is slow, and serve
    a burst of 24 one-second execs at once without a refusal (a hold longer than the queue wait would
    refuse the 17th); a deployment without such bursts gets lower latency under overload with hold 0."""

    proxy_toolbox_max_in_flight: int = Field(default=16, ge=0)
    """Per proxy process; 0: unbounded (requests queue, as before issue #10)."""
    runner_toolbox_max_in_flight: int = Field(default=32, ge=0)
    """Per runner process, across all its sandboxes and every proxy that relays to it; 0: unbounded."""
    toolbox_queue_wait_seconds: float = Field(default=0.2, ge=0)
    """How long a request that finds every slot taken may wait for one (a burst is absorbed, a sustained
    overload refused); past `toolbox_queue_length` waiting, a request is refused at once. 0: refused at
    once."""
    toolbox_queue_length: int = Field(default=512, ge=0)
    """Requests that may wait for a slot at once, per hop: a burst of many agents' short calls (each
    slot turns over in milliseconds) waits briefly instead of being refused; past it, refused at once."""
    toolbox_slot_hold_seconds: float = Field(default=0.1, ge=0)
    """A request still running after this long (a long `exec`, or everything on an overloaded machine)
    gives its slot to the next one: it waits on the sandbox, not on the path. Below the queue wait, so a
    burst of long calls queues instead of being refused. 0: held until the response is complete."""
    toolbox_retry_after_seconds: int = Field(default=1, ge=0)
    """`Retry-After` of a refusal, in whole seconds."""


class RegionSettings(_Base):
    """The region sandboxes are placed in."""

    runner_region: str = "us"


class EngineSettings(_Base):
    """The container engine and what every container it runs gets."""

    docker_host: str = ""
    # CA bundle injected into builds and sandboxes (TLS-intercepting proxies, enterprise CAs).
    ca_bundle: str = ""
    container_nofile: int = 20000
    container_nproc: int = 4096

    @cached_property
    def effective_docker_host(self) -> str:
        if self.docker_host:
            return self.docker_host
        return f"unix://{self.data_dir / 'podman.sock'}"


class SandboxNetworkSettings(_Base):
    """What confines tenant code in sandboxes and build steps alike: user namespace, network, resolvers
    (tidepool_runtime.isolation)."""

    # Every sandbox runs in its own user namespace (Podman's `--userns=auto`): its root is an unprivileged
    # host uid range of this size, distinct per sandbox, taken from the `containers` entry of
    # /etc/subuid and /etc/subgid (set up by scripts/setup-host.sh).
    sandbox_userns: str = "auto:size=65536"
    sandbox_dns_servers: Annotated[list[str], NoDecode] = []
    """DNS servers given to sandboxes (comma-separated or a JSON list); sandboxes reach them on port 53 even
    when they are private. Empty: the engine's default, the host's resolv.conf nameservers."""
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

    @field_validator("sandbox_dns_servers", mode="before")
    @classmethod
    def _split_dns_servers(cls, value: Any) -> Any:
        return _split_list(value)


class BuildIsolationSettings(_Base):
    """Bounds of each RUN step of a snapshot build (tenant code, confined like a sandbox: isolation.py)."""

    build_cpu: float = 2.0
    """CPU cores a build step may use (a CFS quota)."""
    build_memory_gib: float = 4.0
    """Memory of a build step, swap included."""
    build_pids: int = 4096
    """Processes of a build: `pids.max` of its own cgroup, and RLIMIT_NPROC of its steps."""
    build_userns: str = ""
    """User namespace of build steps: "" = none, else Podman's `auto[:size=N]` (a range of its own per build).
    `make up` / `tidepool up` set `auto:size=65536` for the builder, with the build engine they start for it
    (tidepool_stack.supervisor.Stack.start_build_engine). Empty here because on a plain Podman 4.3.1 engine
    whose store idmaps overlay layers (this kernel) images built in a user namespace come out broken
    (host-range owners, `/` unwritable, deletions lost; measured): set it only for such a build engine."""
    build_network_wait_seconds: float = 120.0
    """How long a build waits for the sandbox network (a runner on the engine's host creates it)."""


class SandboxHostSettings(_Base):
    """A runner: its identity and address, the daemon it injects, sandbox isolation and health checks."""

    runner_id: str = ""
    runner_host: str = "127.0.0.1"
    runner_port: int = 3003
    runner_public_url: str = ""
    # Toolbox use is recorded as a sandbox's activity (for auto-stop) at most this often per sandbox.
    activity_write_interval_seconds: float = 10.0
    # Each running sandbox's CPU, memory, disk and network is sampled this often (tests: shorter).
    sandbox_metrics_interval_seconds: float = 10.0
    # How many jobs the runner works on at once (each sandbox's own jobs stay in order, one at a time);
    # more only queues up in the container engine.
    runner_job_concurrency: int = 16
    daemon_dir: Path = REPO_ROOT / "services" / "daemon"
    # OCI runtime for sandboxes, by the name the engine knows it under ("" = the engine's default, runc
    # here). Set e.g. "runsc" (gVisor) or "kata" after registering it with the engine (see the README).
    sandbox_runtime: str = ""
    sandbox_seccomp_profile: str = ""
    """Seccomp profile for sandboxes: path to a JSON profile in Docker's format, read by the runner at start
    and handed to the engine from its runtime folder. Empty: the shipped profile
    (services/runner/tidepool_runner/sandbox-seccomp.json: the engine's default minus creating namespaces:
    no `unshare -Ur` inside a sandbox). `unconfined` is refused: a sandbox always runs filtered."""
    sandbox_firewall: bool = True
    """Let the runner manage the sandbox firewall (needs root / CAP_NET_ADMIN in the host's network
    namespace and iptables). Off only if you isolate sandboxes yourself: they then reach the host, each
    other and the cloud metadata service."""
    sandbox_allow_inter_sandbox: bool = False
    """Widen on purpose: let sandboxes on this runner open connections to each other over the bridge."""
    sandbox_allowed_cidrs: Annotated[list[str], NoDecode] = []
    """Widen on purpose: destinations sandboxes may reach although private or on the host, e.g.
    `10.1.2.0/24,fd00:1::/64` (comma-separated or a JSON list; IPv4 and IPv6)."""
    sandbox_flow_log_group: int = Field(default=7100, ge=0, le=65535 - 64)
    """The first NFLOG group the runner tries for its sandboxes' flow log (it takes the first free one of the
    64 from here: one per runner on a host). The flow log is on whenever the sandbox firewall is."""
    sandbox_domain_refresh_seconds: float = 60.0
    """How often the runner re-resolves the domains of sandboxes' `domainAllowList`s (their addresses
    change, e.g. behind CDNs) and updates their egress rules."""
    # Toolbox health checks (runner): every running sandbox's daemon gets `GET /version` this often; after
    # `daemon_health_failures` unanswered checks in a row (each waiting `daemon_health_timeout_seconds`)
    # its worker is restarted, and if it still does not answer within `daemon_restart_wait_seconds` the
    # sandbox is reported `error` (recoverable).
    daemon_health_interval_seconds: float = 10.0
    daemon_health_timeout_seconds: float = 5.0
    daemon_health_failures: int = 3
    daemon_restart_wait_seconds: float = 30.0

    @field_validator("sandbox_allowed_cidrs", mode="before")
    @classmethod
    def _split_allowed_cidrs(cls, value: Any) -> Any:
        return _split_list(value)

    @cached_property
    def effective_runner_id(self) -> str:
        return self.runner_id or f"runner-{socket.gethostname()}"

    @cached_property
    def effective_runner_url(self) -> str:
        return self.runner_public_url or f"http://{self.runner_host}:{self.runner_port}"

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


class ImageSettings(_Base):
    """The platform's own images."""

    default_snapshot: str = "daytona-small"
    default_image: str = "localhost/tidepool/default:0.3.0"  # bump when images/default changes
    default_dockerfile: Path = REPO_ROOT / "images" / "default" / "Dockerfile"
    base_image: str = "localhost/tidepool/base:bookworm"


class WarmPoolSettings(_Base):
    """Warm pools (behaviour: wire contract §2.8, design digest §1.8): started sandboxes of no organization,
    claimed by a matching create instead of a cold start."""

    # Snapshots the operator keeps warm (names; the default snapshot unless set otherwise; [] turns the
    # configured pools off — pools made with `POST /warm-pools` still run).
    warm_pool_snapshots: list[str] = ["daytona-small"]
    # A pool's size follows its recent demand (creates that asked for it within the window), kept between
    # the floor and the ceiling; a `POST /warm-pools` pool's `pool` is its floor.
    warm_pool_min: int = 1
    warm_pool_max: int = 8
    warm_pool_demand_window_seconds: float = 120.0
    # How often pools are checked and refilled, and how many members one check may start at once.
    warm_pool_tick_seconds: float = 2.0
    warm_pool_refill_batch: int = 4
    # The installation's cap on warm members of all pools together (unclaimed, not being removed): pools
    # beyond it wait, with the reason on the pool (`errorReason`).
    warm_pool_max_members: int = 32
    # A pool whose members fail to start waits before the next try: one tick, doubled per failure in a row,
    # at most this long (a started member resets it).
    warm_pool_backoff_max_seconds: float = 300.0


class SchedulingSettings(_Base):
    """The scheduler's reconciliation."""

    # Scheduler reconciliation: how long a job may stay unanswered before it is re-sent, and how often.
    reconcile_interval_seconds: float = 5.0
    job_resend_after_seconds: float = 45.0
    job_max_attempts: int = 3
    # Lifecycle timers (auto-stop, auto-delete): how often they are checked, and how long one "minute" of
    # the intervals users give lasts — 60 in production; a test stack shortens it to run timers in seconds.
    lifecycle_tick_seconds: float = 30.0
    lifecycle_minute_seconds: float = 60.0
    scheduler_lease_seconds: float = 10.0
    """Leader lease of scheduler replicas (tidepool_scheduler.leader): a replica takes over when the
    leader's lease went unrenewed this long; the leader renews it every third of it."""
    scheduler_id: str = ""
    """This replica's id in the lease; empty: host name and process id."""
    # How many intents the scheduler handles at once (each is a few KV reads and one publish).
    scheduler_intent_concurrency: int = 32


class ObjectStorageSettings(_Base):
    """Object storage (S3) for declarative-build context."""

    # Object storage (S3) for declarative-build context. Embedded: `rclone serve s3` over TLS (the SDK
    # uploads only over https). `s3_ca_file` is the CA that signed the endpoint's certificate, if private.
    s3_endpoint: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "tidepool-builds"
    s3_region: str = "us-east-1"
    s3_ca_file: str = ""
    # `s3_endpoint` is always Tidepool's object-storage gateway (tidepool_stack.s3_gateway), and
    # `s3_secret_key` the gateway's master secret from which organization-scoped, expiring keys are derived
    # (tidepool_runtime.object_keys). No key that reaches a tenant opens more than its organization's root.


class VolumeSettings(_Base):
    """Volumes (persistent storage in the object storage, FUSE-mounted into sandboxes)."""

    # Volumes an organization may have (not counting deleted ones), as Daytona's 100.
    volume_limit_per_organization: int = 100


class QuotaSettings(_Base):
    """Organization quotas and API rate limits (behaviour spec "limits"); an organization's own values
    (`PATCH /organizations/{id}/quota`) override these installation defaults."""

    # Daytona's tier whose totals apply to an organization without its own (1..4; limits.mdx Resources).
    quota_tier: int = 1
    # Tier 1 memory: the docs say 10 GiB in one table and 20 in another (spec conflicts table: 10).
    quota_tier1_memory_gib: int = 10
    # Requests per window per organization, by throttler (`authenticated`, `sandbox-create`,
    # `sandbox-lifecycle`); 0 = the tier's. The window is Daytona's minute unless a test shortens it.
    rate_limit_authenticated: int = 0
    rate_limit_sandbox_create: int = 0
    rate_limit_sandbox_lifecycle: int = 0
    rate_limit_window_seconds: float = 60.0


class ObjectStorageBackendSettings(_Base):
    """Where the object-storage gateway stores: an external S3, given only to the gateway."""

    # Empty: a directory under data_dir (the embedded default). Set: every organization's objects go under
    # `{s3_backend_bucket}/{s3_backend_prefix}orgs/{org}/` on this S3, reached with this key pair, which
    # never leaves the gateway (tenants and services get organization-scoped keys).
    s3_backend_endpoint: str = ""
    s3_backend_access_key: str = ""
    s3_backend_secret_key: str = ""
    s3_backend_bucket: str = ""
    s3_backend_region: str = "us-east-1"
    s3_backend_prefix: str = ""
    s3_backend_ca_file: str = ""


class RegistryUrlSettings(_Base):
    """The platform's OCI registry."""

    # OCI registry that built and pulled snapshots are pushed to, so any runner can pull them on demand
    # ("" = images stay on the engine that built them). Embedded: Debian's docker-registry on loopback.
    registry_url: str = ""
    # Registries on the platform's own host (loopback, its addresses and names) are refused as image
    # sources, so no tenant reaches the host's ports through a pull; an operator lists exceptions here,
    # as `host:port` (JSON list in the environment: TIDEPOOL_ALLOWED_HOST_REGISTRIES='["vm:5000"]').
    allowed_host_registries: list[str] = []


class RegistryMirrorSettings(_Base):
    """Mirrors the builder and the runners pull through (tidepool_runtime.registry_mirrors)."""

    registry_mirrors: str = ""
    """`REGISTRY=MIRROR[,…]` or a JSON object, e.g. `docker.io=http://127.0.0.1:5001,ghcr.io=https://m.example`:
    anonymous pulls of that registry's images (snapshot sources, Dockerfile FROMs, runner pulls) try its
    mirrors in order, then the registry itself."""

    @field_validator("registry_mirrors")
    @classmethod
    def _mirrors_parse(cls, value: str) -> str:
        parse_registry_mirrors(value)  # ValueError naming the bad entry stops the service at start
        return value

    @cached_property
    def mirrors(self) -> dict[str, list[Mirror]]:
        return parse_registry_mirrors(self.registry_mirrors)


class RegistryLoginSettings(_Base):
    """Its login: only the builder (push) and the runners (pull) are given it."""

    # Its login (htpasswd, bcrypt): only the builder (push) and the runners (pull) are given it.
    registry_username: str = ""
    registry_password: str = ""


class BuildCacheSettings(_Base):
    """The declarative-build cache."""

    # Declarative builds are cached by content for this long after their last use.
    build_cache_hours: float = 24.0


class SecretKeySettings(_Base):
    """Encryption of secrets at rest."""

    # Encrypts secrets at rest (registry passwords). Empty: generated once under data_dir.
    secret_key: str = ""


class SigningSealSettings(_Base):
    """Seals sandbox signing keys on the bus: the API and the proxy only (tidepool_runtime.sealing)."""

    signing_seal_key: str = ""
    """Empty: generated once under data_dir (one machine); give the API and the proxy the same value."""


class RegistrySealSettings(_Base):
    """Seals registry passwords on the bus: the API and the builder only (tidepool_runtime.sealing)."""

    registry_seal_key: str = ""
    """Empty: generated once under data_dir (one machine); give the API and the builder the same value."""


class OtelSealSettings(_Base):
    """Seals organizations' OTLP headers on the bus: the API and the telemetry service only."""

    otel_seal_key: str = ""
    """Empty: generated once under data_dir (one machine); give the API and telemetry the same value."""


class OrganizationMetricsSettings(_Base):
    """The organization metrics (`daytona.sandbox.used_cpu`, ...; feature inventory §10 B)."""

    organization_metrics_interval_seconds: float = 60.0
    """How often each organization's metrics are pushed to its OTLP endpoint(s)."""
    organization_metrics_otlp_endpoint: str = ""
    """The operator's OTLP endpoint for every organization's metrics (`http(s)://` OTLP/HTTP base URL or
    `grpc(s)://host:port`), besides each organization's own (`PUT …/otel-config`); empty: none."""


# What each service reads, and so all its Deployment is given (tests/unit/test_deploy_manifests.py).


class TenantEndpointSettings(_Base):
    """Where tenants' own destinations may point: webhook URLs, an organization's OTLP endpoint."""

    tenant_endpoint_allowed_cidrs: Annotated[list[str], NoDecode] = []
    """Widen on purpose: non-public networks tenants' webhook URLs and OTLP endpoints may resolve to, e.g.
    `10.1.2.0/24,fd00:1::/64` (comma-separated or a JSON list). Empty: public addresses only (no loopback,
    private, link-local / metadata, CGNAT, multicast, ...; tidepool_runtime.netguard)."""

    @field_validator("tenant_endpoint_allowed_cidrs", mode="before")
    @classmethod
    def _split_tenant_endpoint_cidrs(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("tenant_endpoint_allowed_cidrs")
    @classmethod
    def _check_tenant_endpoint_cidrs(cls, value: list[str]) -> list[str]:
        netguard.parse_networks(value)  # a typo fails the start, not the first request
        return value

    @cached_property
    def tenant_endpoint_allowed_networks(self) -> tuple[netguard.IPNetwork, ...]:
        return netguard.parse_networks(self.tenant_endpoint_allowed_cidrs)


class WebhookSettings(_Base):
    """Webhook delivery (behaviour spec §17; README "Webhooks")."""

    # Endpoint URLs must be HTTPS (the docs); `true` also accepts http:// (a receiver on a private network,
    # the tests' loopback receiver).
    webhook_allow_insecure_urls: bool = False
    # A failed attempt is retried after base * 2^(attempts - 1) seconds, at most `max`, until the message is
    # `give_up` seconds old (then it is recorded as failed and the next one of its resource goes).
    webhook_retry_base_seconds: float = 1.0
    webhook_retry_max_seconds: float = 300.0
    webhook_give_up_seconds: float = 3 * 24 * 3600.0
    # One attempt's time limit, and how often the deliverer looks for due messages when nothing woke it.
    webhook_timeout_seconds: float = 15.0
    webhook_poll_seconds: float = 1.0


class ApiSettings(
    CommonSettings,
    DatabaseSettings,
    ApiHttpSettings,
    PublicProxySettings,
    RegionSettings,
    ImageSettings,
    ObjectStorageSettings,
    VolumeSettings,
    RegistryUrlSettings,
    BuildCacheSettings,
    SecretKeySettings,
    SigningSealSettings,
    RegistrySealSettings,
    PublicSshGatewaySettings,
    OtelSealSettings,
    WarmPoolSettings,
    QuotaSettings,
    TenantEndpointSettings,
    WebhookSettings,
    RunnerLossSettings,
):
    pass


class SchedulerSettings(CommonSettings, SchedulingSettings, RunnerLossSettings):
    pass


class BuilderSettings(
    CommonSettings,
    EngineSettings,
    ImageSettings,
    ObjectStorageSettings,
    RegistryUrlSettings,
    RegistryLoginSettings,
    RegistryMirrorSettings,
    BuildIsolationSettings,
    SandboxNetworkSettings,
    RegistrySealSettings,
):
    pass


class ProxySettings(
    CommonSettings,
    ProxyHttpSettings,
    PublicProxySettings,
    RunnerTokenSettings,
    SigningSealSettings,
    ToolboxAdmissionSettings,
):
    pass


class SshGatewaySettings(
    CommonSettings, PublicSshGatewaySettings, SshGatewayHostSettings, RunnerTokenSettings
):
    pass


class TelemetrySettings(
    CommonSettings, RegionSettings, OtelSealSettings, OrganizationMetricsSettings, TenantEndpointSettings
):
    # How long sandbox resource samples are kept (Daytona: 3 days); set as the samples stream's max_age.
    sandbox_metrics_retention_seconds: float = 3 * 24 * 3600.0
    # How often each running sandbox's latest sample goes to its organization's OTLP endpoint (otel-config).
    sandbox_metrics_export_interval_seconds: float = 15.0


class RunnerSettings(
    CommonSettings,
    EngineSettings,
    SandboxHostSettings,
    RunnerTokenSettings,
    RegionSettings,
    # Volumes: the runner FUSE-mounts them from the object storage with organization-scoped service keys.
    ObjectStorageSettings,
    RegistryUrlSettings,
    RegistryLoginSettings,
    RegistryMirrorSettings,
    SandboxNetworkSettings,
    ToolboxAdmissionSettings,
    RunnerHeartbeatSettings,
):
    pass


class ObjectStorageGatewayServerSettings(_Base):
    """The gateway as its own process (Kubernetes); `make up` starts it on loopback with a private CA."""

    # host:port it listens on; TLS certificate and key files (empty: plain http behind a TLS terminator —
    # the SDK uploads only over https).
    s3_gateway_address: str = "0.0.0.0:9000"
    s3_gateway_tls_cert: str = ""
    s3_gateway_tls_key: str = ""


class ObjectStorageGatewaySettings(
    CommonSettings, ObjectStorageSettings, ObjectStorageBackendSettings, ObjectStorageGatewayServerSettings
):
    pass


class Settings(
    ApiSettings,
    SchedulerSettings,
    BuilderSettings,
    ProxySettings,
    TelemetrySettings,
    RunnerSettings,
    ObjectStorageGatewaySettings,
):
    """Everything: for the single-machine stack, which configures all services, and for tests."""


def load_settings() -> Settings:
    return Settings()
