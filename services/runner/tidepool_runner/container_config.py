"""The Docker Engine API body that turns a SandboxSpec into a container (pure: no I/O, unit-tested).

Isolation (issue #7), in layers, each assuming the one above it failed:
- a private user namespace per sandbox (`UsernsMode`): its root, which `sudo` reaches, is an unprivileged
  host uid range of its own, so limits keyed by uid (processes, files) and file ownership are per sandbox;
- the smallest capability set that keeps `sudo apt-get install` working (no MKNOD, NET_RAW,
  NET_BIND_SERVICE: ports below 1024 are opened by the `ip_unprivileged_port_start` sysctl instead);
- a seccomp profile: the engine's default minus creating namespaces (seccomp.py; never `unconfined`),
  so sandbox code cannot become a full-capability root of a nested user namespace; and the engine's
  default AppArmor/SELinux profile where the host has such an LSM;
- every host path shared with the sandbox comes from the runner's private tmpfs (`runtime_dir`), so
  `/proc/self/mountinfo` shows `/daemon` or `/sockets/<id>`, not where the platform lives on the host;
- the writable layer lives on the sandbox's own filesystem of `disk_gib` (see disks.py), attached by the
  runner between create and start; the engine's log of the container is capped.
What is left is the kernel: see the README's "Isolation" section for adding gVisor or Kata as runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tidepool_contracts.models import SandboxSpec
from tidepool_runtime.isolation import SANDBOX_CAPABILITIES
from tidepool_runtime.settings import RunnerSettings

__all__ = ["SANDBOX_CAPABILITIES", "build_container_config"]

CONTAINER_NAME_PREFIX = "tidepool-"
SANDBOX_LABEL = "tidepool.sandbox"
ORGANIZATION_LABEL = "tidepool.organization"
RUNNER_LABEL = "tidepool.runner"
CPU_LABEL = "tidepool.cpu"
MEMORY_LABEL = "tidepool.memory_gib"
DISK_LABEL = "tidepool.disk_gib"
# The runner's home (its data directory), hashed: a runner adopts, checks and counts only the containers it
# made, even when several platforms (test stacks, a benchmark's baseline) share one engine and runner id.
RUNNER_HOME_LABEL = "tidepool.runner_home"

# Where the runner's daemon directory, its Python runtime and the per-sandbox socket directory appear inside
# the sandbox.
DAEMON_MOUNT_PATH = "/opt/tidepool/daemon"
RUNTIME_MOUNT_PATH = "/opt/tidepool/runtime"
SOCKET_MOUNT_DIR = "/run/tidepool"
TOOLBOX_SOCKET_NAME = "toolbox.sock"
# The daemon runs on its own runtime (toolbox_runtime.py), started by that runtime's own dynamic loader with
# its own libraries: nothing of the image is used, so images without python3, glibc or a shell work.
DAEMON_ENTRYPOINT = [
    f"{RUNTIME_MOUNT_PATH}/lib/ld.so",
    "--library-path",
    f"{RUNTIME_MOUNT_PATH}/lib",
    f"{RUNTIME_MOUNT_PATH}/bin/python3",
    # Isolated mode: the user's PYTHONPATH/PYTHONHOME or a stray module in the cwd can't hijack the daemon.
    "-I",
    f"{DAEMON_MOUNT_PATH}/main.py",
    "--socket",
    f"{SOCKET_MOUNT_DIR}/{TOOLBOX_SOCKET_NAME}",
]

CONTAINER_CA_BUNDLE_PATH = "/etc/ssl/certs/ca-certificates.crt"
# Every common TLS stack's override variable, so pip, requests, node, git and curl all trust the bundle.
CA_BUNDLE_ENV_VARS = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
)

PIDS_LIMIT = 4096
# Lets the sandbox user serve on port 80 without sudo, as in Daytona, with no capability for it.
SANDBOX_SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "0"}
# The engine keeps the daemon's stdout/stderr on the host's disk: cap it (the sandbox's own disk is not).
CONTAINER_LOG_MAX_SIZE = "10m"
HOSTNAME_MAX_LENGTH = 63
GIB = 1024**3


def container_name(sandbox_id: str) -> str:
    return f"{CONTAINER_NAME_PREFIX}{sandbox_id}"


def sandbox_socket_dir(settings: RunnerSettings, sandbox_id: str) -> Path:
    return settings.sockets_dir / sandbox_id


def toolbox_socket_path(settings: RunnerSettings, sandbox_id: str) -> Path:
    return sandbox_socket_dir(settings, sandbox_id) / TOOLBOX_SOCKET_NAME


def container_env(spec: SandboxSpec, settings: RunnerSettings) -> list[str]:
    env: dict[str, str] = {
        # What upstream runners expose to sandbox code; the user's own env wins on conflicts.
        "DAYTONA_SANDBOX_ID": spec.sandbox_id,
        "DAYTONA_SANDBOX_USER": spec.os_user,
        "DAYTONA_ORGANIZATION_ID": spec.organization_id,
    }
    env.update(spec.env)
    if settings.ca_bundle:
        env.update(dict.fromkeys(CA_BUNDLE_ENV_VARS, CONTAINER_CA_BUNDLE_PATH))
    return [f"{key}={value}" for key, value in env.items()]


def runner_home(settings: RunnerSettings) -> str:
    """RUNNER_HOME_LABEL's value for this runner: a hash of its data directory."""
    return hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:16]


def container_labels(spec: SandboxSpec, runner_id: str, home: str = "") -> dict[str, str]:
    return {
        RUNNER_HOME_LABEL: home,
        SANDBOX_LABEL: spec.sandbox_id,
        ORGANIZATION_LABEL: spec.organization_id,
        RUNNER_LABEL: runner_id,
        # Resources as labels: the heartbeat sums them from one `list` call, no per-container inspect.
        CPU_LABEL: str(spec.cpu),
        MEMORY_LABEL: str(spec.memory_gib),
        DISK_LABEL: str(spec.disk_gib),
    }


def staged_daemon_dir(settings: RunnerSettings) -> Path:
    """The runner's read-only copy of the daemon on its tmpfs (see staging.py)."""
    return settings.runtime_dir / "daemon"


def staged_runtime_dir(settings: RunnerSettings) -> Path:
    """The runner's read-only Python runtime for the daemon on its tmpfs (see toolbox_runtime.py)."""
    return settings.runtime_dir / "pyrt"


def staged_ca_bundle(settings: RunnerSettings) -> Path:
    return settings.runtime_dir / "ca-bundle.crt"


def staged_seccomp_profile(settings: RunnerSettings) -> Path:
    """The runner's copy of the sandbox seccomp profile on its tmpfs (see staging.py); the engine reads it
    by path (Podman's compat API takes `seccomp=<path>`, not the JSON itself as Docker does)."""
    return settings.runtime_dir / "seccomp.json"


def volume_mount_point(settings: RunnerSettings, sandbox_id: str, index: int) -> Path:
    """Where the runner FUSE-mounts the sandbox's `index`-th volume (see volumes.py)."""
    return settings.runtime_dir / "volumes" / sandbox_id / str(index)


def container_binds(spec: SandboxSpec, settings: RunnerSettings) -> list[str]:
    binds = [
        f"{staged_daemon_dir(settings)}:{DAEMON_MOUNT_PATH}:ro",
        f"{staged_runtime_dir(settings)}:{RUNTIME_MOUNT_PATH}:ro",
        # nosuid, nodev, noexec: the toolbox channel is a socket, nothing in it is ever run.
        f"{sandbox_socket_dir(settings, spec.sandbox_id)}:{SOCKET_MOUNT_DIR}:rw,nosuid,nodev,noexec",
    ]
    if settings.ca_bundle:
        binds.append(f"{staged_ca_bundle(settings)}:{CONTAINER_CA_BUNDLE_PATH}:ro")
    for index, volume in enumerate(spec.volumes):
        binds.append(
            f"{volume_mount_point(settings, spec.sandbox_id, index)}:{volume.mount_path}:rw,nosuid,nodev"
        )
    return binds


def network_mode(spec: SandboxSpec, settings: RunnerSettings) -> str:
    """The runner's sandbox network (isolated by its host firewall), `networkBlockAll` included: its rules
    (egress.py) reject everything, and can be lifted on the running sandbox (an engine cannot attach a
    network to a container created without one)."""
    return settings.sandbox_network


def dns_servers(spec: SandboxSpec, settings: RunnerSettings) -> list[str]:
    """Empty: the engine's default (the host's resolvers), which the firewall then allows."""
    return list(settings.sandbox_dns_servers)


def daemon_entrypoint(spec: SandboxSpec) -> list[str]:
    argv = [*DAEMON_ENTRYPOINT, "--user", spec.os_user]
    if spec.entrypoint:
        # The image's own entrypoint runs under the daemon, in the toolbox's "entrypoint" session.
        argv += ["--entrypoint-json", json.dumps(spec.entrypoint)]
    return argv


def build_container_config(spec: SandboxSpec, settings: RunnerSettings, runner_id: str) -> dict[str, Any]:
    """`POST /containers/create` body. The daemon is the entrypoint; the toolbox is reached via a unix socket,
    so nothing is published on the host and the container never needs privileges."""
    config = _container_config(spec, settings, runner_id)
    if settings.sandbox_runtime:
        config["HostConfig"]["Runtime"] = settings.sandbox_runtime
    return config


def _container_config(spec: SandboxSpec, settings: RunnerSettings, runner_id: str) -> dict[str, Any]:
    memory_bytes = spec.memory_gib * GIB
    return {
        "Image": spec.image,
        # Root only until the daemon has made sure the user exists (public images lack it), then it drops to
        # `os_user` for good; every toolbox process runs as that user.
        "User": "0",
        "Hostname": spec.sandbox_id[:HOSTNAME_MAX_LENGTH],
        "Env": container_env(spec, settings),
        "Labels": container_labels(spec, runner_id, runner_home(settings)),
        # No WorkingDir: the engine would create a missing one as the host's root, which a user namespace
        # shows as `nobody`; the daemon makes the user's home itself and works from there.
        "Entrypoint": daemon_entrypoint(spec),
        # An image Cmd would otherwise be appended to the daemon's argv.
        "Cmd": None,
        "Tty": False,
        "OpenStdin": False,
        "HostConfig": {
            "NanoCpus": spec.cpu * 1_000_000_000,
            "Memory": memory_bytes,
            # Equal to Memory: no swap on top of the memory limit.
            "MemorySwap": memory_bytes,
            "PidsLimit": PIDS_LIMIT,
            # The engine's defaults can exceed this host's hard limits and runc then refuses to start
            # ("error setting rlimit type 7"): always set them explicitly.
            "Ulimits": [
                {"Name": "nofile", "Soft": settings.container_nofile, "Hard": settings.container_nofile},
                {"Name": "nproc", "Soft": settings.container_nproc, "Hard": settings.container_nproc},
            ],
            # A tiny init (catatonit) as PID 1 reaps the zombies left by user processes.
            "Init": True,
            "Privileged": False,
            "UsernsMode": settings.sandbox_userns,
            "CapDrop": ["ALL"],
            "CapAdd": list(SANDBOX_CAPABILITIES),
            "Sysctls": dict(SANDBOX_SYSCTLS),
            "SecurityOpt": [f"seccomp={staged_seccomp_profile(settings)}"],
            "LogConfig": {"Type": "k8s-file", "Config": {"max-size": CONTAINER_LOG_MAX_SIZE}},
            "Binds": container_binds(spec, settings),
            "NetworkMode": network_mode(spec, settings),
            "Dns": dns_servers(spec, settings),
            "PublishAllPorts": False,
            "PortBindings": {},
            "RestartPolicy": {"Name": "no"},
        },
    }
