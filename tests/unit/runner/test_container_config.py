"""The container body the runner sends to the engine: resources, isolation, mounts and identity."""

from __future__ import annotations

from pathlib import Path

from tidepool_contracts.models import SandboxSpec
from tidepool_runner.container_config import (
    CA_BUNDLE_ENV_VARS,
    RUNNER_HOME_LABEL,
    build_container_config,
    container_name,
    runner_home,
)
from tidepool_runtime.settings import Settings


def make_spec(**overrides: object) -> SandboxSpec:
    fields: dict[str, object] = {
        "sandbox_id": "4f1c2a9e-0000-4000-8000-000000000001",
        "organization_id": "org-1",
        "image": "localhost/tidepool/default:0.1.0",
        "cpu": 2,
        "memory_gib": 3,
        "env": {"FOO": "bar", "DAYTONA_SANDBOX_USER": "overridden"},
    }
    fields.update(overrides)
    return SandboxSpec.model_validate(fields)


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    # Independent of the environment (`make` exports TIDEPOOL_CA_BUNDLE).
    values: dict[str, object] = {"ca_bundle": "", **overrides}
    return Settings(data_dir=tmp_path, daemon_dir=tmp_path / "daemon", **values)  # type: ignore[arg-type]


def test_resources_identity_and_isolation(tmp_path: Path) -> None:
    spec = make_spec()
    config = build_container_config(spec, make_settings(tmp_path), "runner-a")
    host = config["HostConfig"]
    assert container_name(spec.sandbox_id) == f"tidepool-{spec.sandbox_id}"
    assert config["Image"] == spec.image
    assert config["User"] == "0"  # the daemon creates the user if needed, then drops to it
    assert "WorkingDir" not in config  # the daemon makes the home directory inside the user namespace
    assert config["Hostname"] == spec.sandbox_id
    # Issue #15: the daemon's own runtime, started by its own loader, never the image's python3.
    assert config["Entrypoint"][:4] == [
        "/opt/tidepool/runtime/lib/ld.so",
        "--library-path",
        "/opt/tidepool/runtime/lib",
        "/opt/tidepool/runtime/bin/python3",
    ]
    assert config["Entrypoint"][4:6] == ["-I", "/opt/tidepool/daemon/main.py"]
    assert config["Entrypoint"][6:] == ["--socket", "/run/tidepool/toolbox.sock", "--user", "daytona"]
    assert config["Cmd"] is None
    assert host["NanoCpus"] == 2_000_000_000
    assert host["Memory"] == host["MemorySwap"] == 3 * 1024**3
    assert host["PidsLimit"] == 4096
    assert host["Init"] is True
    assert host["Privileged"] is False
    # Issue #7: a user namespace of its own, the smallest capability set, a seccomp profile.
    assert host["UsernsMode"] == "auto:size=65536"
    assert host["CapDrop"] == ["ALL"]
    assert set(host["CapAdd"]) == {
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "AUDIT_WRITE",
        "SYS_CHROOT",
    }
    assert not {"MKNOD", "NET_RAW", "NET_ADMIN", "SYS_ADMIN"} & set(host["CapAdd"])
    # The runner's staged profile (the engine's default minus namespaces), by path: Podman reads it itself.
    assert host["SecurityOpt"] == [f"seccomp={tmp_path / 'run' / 'seccomp.json'}"]
    assert host["Sysctls"] == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert host["LogConfig"]["Config"]["max-size"] == "10m"
    assert host["PortBindings"] == {}
    assert {limit["Name"]: limit["Hard"] for limit in host["Ulimits"]} == {"nofile": 20000, "nproc": 4096}
    # Shared host paths come from the runner's private tmpfs, never from where the platform lives.
    assert host["Binds"] == [
        f"{tmp_path / 'run' / 'daemon'}:/opt/tidepool/daemon:ro",
        f"{tmp_path / 'run' / 'pyrt'}:/opt/tidepool/runtime:ro",
        f"{tmp_path / 'run' / 'sockets' / spec.sandbox_id}:/run/tidepool:rw,nosuid,nodev,noexec",
    ]
    assert config["Labels"]["tidepool.sandbox"] == spec.sandbox_id
    assert config["Labels"]["tidepool.organization"] == "org-1"
    # The user's env wins over the defaults the runner adds.
    assert "FOO=bar" in config["Env"]
    assert "DAYTONA_SANDBOX_USER=overridden" in config["Env"]
    assert f"DAYTONA_SANDBOX_ID={spec.sandbox_id}" in config["Env"]
    # The runner's isolated sandbox network (see tidepool_runner.network), never the engine's default one.
    assert host["NetworkMode"] == "tidepool-sandboxes"
    assert host["Dns"] == []  # the engine's default resolvers


def test_root_user_long_id_blocked_network_and_ca_bundle(tmp_path: Path) -> None:
    spec = make_spec(sandbox_id="x" * 80, os_user="root", network_block_all=True)
    settings = make_settings(tmp_path, ca_bundle="/etc/corp-ca.pem", sandbox_network="tidepool")
    config = build_container_config(spec, settings, "runner-a")
    assert config["Hostname"] == "x" * 63
    # On the sandbox network all the same: its own firewall rules block everything (runner egress.py).
    assert config["HostConfig"]["NetworkMode"] == "tidepool"
    staged = tmp_path / "run" / "ca-bundle.crt"  # the runner's copy of /etc/corp-ca.pem
    assert f"{staged}:/etc/ssl/certs/ca-certificates.crt:ro" in config["HostConfig"]["Binds"]
    for variable in CA_BUNDLE_ENV_VARS:
        assert f"{variable}=/etc/ssl/certs/ca-certificates.crt" in config["Env"]


def test_sandbox_network_and_dns_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, sandbox_network="tidepool", sandbox_dns_servers=["192.168.1.53"])
    config = build_container_config(make_spec(), settings, "r")
    assert config["HostConfig"]["NetworkMode"] == "tidepool"
    assert config["HostConfig"]["Dns"] == ["192.168.1.53"]
    blocked = build_container_config(make_spec(network_block_all=True), settings, "r")
    assert (blocked["HostConfig"]["NetworkMode"], blocked["HostConfig"]["Dns"]) == (
        "tidepool",
        ["192.168.1.53"],
    )


def test_an_operator_chosen_oci_runtime(tmp_path: Path) -> None:
    default = build_container_config(make_spec(), make_settings(tmp_path), "r")
    assert "Runtime" not in default["HostConfig"]  # the engine's default (runc here)
    gvisor = build_container_config(make_spec(), make_settings(tmp_path, sandbox_runtime="runsc"), "r")
    assert gvisor["HostConfig"]["Runtime"] == "runsc"


def test_each_runner_home_labels_its_own_containers(tmp_path: Path) -> None:
    """Two platforms on one engine (test stacks, a bench baseline) share a runner id; the home label tells
    their containers apart, so neither adopts nor health-checks the other's."""
    first = build_container_config(make_spec(), make_settings(tmp_path / "a"), "runner-x")["Labels"]
    second = build_container_config(make_spec(), make_settings(tmp_path / "b"), "runner-x")["Labels"]
    assert first[RUNNER_HOME_LABEL] and second[RUNNER_HOME_LABEL]
    assert first[RUNNER_HOME_LABEL] != second[RUNNER_HOME_LABEL]
    assert first[RUNNER_HOME_LABEL] == runner_home(make_settings(tmp_path / "a"))
