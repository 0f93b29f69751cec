"""How the builder confines RUN steps: `/libpod/build` parameters from the sandboxes' shared definitions."""

from __future__ import annotations

import json
from pathlib import Path

import aiodocker
import pytest

from tidepool_builder.build_cgroup import PARENT, BuildCgroup, BuildCgroupError, sweep_stale
from tidepool_builder.docker_build import BuildIsolation, wait_for_sandbox_network
from tidepool_runner import container_config
from tidepool_runtime.isolation import (
    SANDBOX_CAPABILITIES,
    SandboxNetworkError,
    auto_userns_size,
    network_config,
)
from tidepool_runtime.settings import Settings


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def test_run_steps_join_the_sandbox_network_not_the_host_namespace(tmp_path: Path) -> None:
    query = BuildIsolation.from_settings(make_settings(tmp_path)).query()
    # Without nsoptions podman puts RUN steps in the HOST's network namespace.
    network = {"Name": "network", "Host": False, "Path": "tidepool-sandboxes"}
    assert json.loads(query["nsoptions"]) == [network]
    assert query["networkmode"] == "NetworkEnabled"
    assert "idmappingoptions" not in query  # no user namespace unless asked for (TIDEPOOL_BUILD_USERNS)


def test_run_steps_get_a_private_user_namespace_when_enabled(tmp_path: Path) -> None:
    query = BuildIsolation.from_settings(make_settings(tmp_path, build_userns="auto:size=4096")).query()
    namespaces = {entry["Name"]: entry for entry in json.loads(query["nsoptions"])}
    assert namespaces["user"]["Host"] is False
    assert namespaces["network"] == {"Name": "network", "Host": False, "Path": "tidepool-sandboxes"}
    mappings = json.loads(query["idmappingoptions"])
    assert mappings["AutoUserNs"] is True
    assert mappings["AutoUserNsOpts"] == {"Size": 4096}
    assert mappings["HostUIDMapping"] is False and mappings["HostGIDMapping"] is False


def test_run_steps_keep_only_the_sandbox_capabilities(tmp_path: Path) -> None:
    query = BuildIsolation.from_settings(make_settings(tmp_path)).query()
    assert json.loads(query["dropcaps"]) == ["ALL"]
    added = json.loads(query["addcaps"])
    assert added == [f"CAP_{name}" for name in SANDBOX_CAPABILITIES]
    assert not {"CAP_MKNOD", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"} & set(added)
    # One definition: the runner gives sandboxes exactly the same set.
    assert container_config.SANDBOX_CAPABILITIES is SANDBOX_CAPABILITIES


def test_run_steps_are_bounded_in_cpu_memory_and_processes(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, build_cpu=1.5, build_memory_gib=2, build_pids=512, container_nofile=1000
    )
    query = BuildIsolation.from_settings(settings).query()
    assert query["memory"] == query["memswap"] == str(2 * 1024**3)
    assert int(query["cpuquota"]) / int(query["cpuperiod"]) == 1.5
    assert json.loads(query["ulimits"]) == ["nproc=512:512", "nofile=1000:1000"]
    assert "dnsservers" not in query


def test_run_steps_use_the_sandbox_dns_servers_when_set(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, sandbox_dns_servers="9.9.9.9,1.1.1.1")
    assert json.loads(BuildIsolation.from_settings(settings).query()["dnsservers"]) == ["9.9.9.9", "1.1.1.1"]


@pytest.mark.parametrize(
    ("userns", "size"), [("auto", 65536), ("auto:size=1024", 1024), ("auto:uidmapping=0:0:1,size=2048", 2048)]
)
def test_auto_userns_size(userns: str, size: int) -> None:
    assert auto_userns_size(userns) == size


@pytest.mark.parametrize("userns", ["host", "keep-id", "private"])
def test_builds_refuse_a_user_namespace_that_is_not_private(tmp_path: Path, userns: str) -> None:
    with pytest.raises(ValueError, match="auto"):
        BuildIsolation.from_settings(make_settings(tmp_path, build_userns=userns))


class FakeNetwork:
    def __init__(self, inspect: dict[str, object]) -> None:
        self.inspect = inspect

    async def show(self) -> dict[str, object]:
        return self.inspect


class FakeNetworks:
    """`docker.networks.get`: 404 for the first `missing_for` calls, then the network."""

    def __init__(self, inspect: dict[str, object], missing_for: int) -> None:
        self.inspect = inspect
        self.missing_for = missing_for
        self.calls = 0

    async def get(self, name: str) -> FakeNetwork:
        self.calls += 1
        if self.calls <= self.missing_for:
            raise aiodocker.DockerError(404, {"message": f"network {name} not found"})
        return FakeNetwork(self.inspect)


class FakeDocker:
    def __init__(self, networks: FakeNetworks) -> None:
        self.networks = networks


def network_inspect(settings: Settings, bridge: str | None = None) -> dict[str, object]:
    config = network_config(settings)
    return {
        "Name": config["Name"],
        "Labels": {**config["Labels"], "tidepool.bridge": bridge or settings.sandbox_network_bridge},
        "IPAM": config["IPAM"],
    }


async def test_builds_wait_for_the_runner_to_create_the_sandbox_network(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    networks = FakeNetworks(network_inspect(settings), missing_for=2)
    await wait_for_sandbox_network(FakeDocker(networks), settings, poll_seconds=0)  # type: ignore[arg-type]
    assert networks.calls == 3


async def test_builds_refuse_to_run_without_the_sandbox_network(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, build_network_wait_seconds=0)
    networks = FakeNetworks(network_inspect(settings), missing_for=10**6)
    with pytest.raises(SandboxNetworkError, match="start a runner"):
        await wait_for_sandbox_network(FakeDocker(networks), settings, poll_seconds=0)  # type: ignore[arg-type]


async def test_builds_refuse_a_sandbox_network_on_another_bridge(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    networks = FakeNetworks(network_inspect(settings, bridge="elsewhere0"), missing_for=0)
    with pytest.raises(SandboxNetworkError, match="firewall could not protect it"):
        await wait_for_sandbox_network(FakeDocker(networks), settings, poll_seconds=0)  # type: ignore[arg-type]


def fake_v1_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    for hierarchy in ("pids", "memory", "cpu", "unified"):
        (root / hierarchy).mkdir(parents=True)
    return root


def test_a_build_cgroup_bounds_the_builds_processes_and_is_removed_everywhere(tmp_path: Path) -> None:
    root = fake_v1_root(tmp_path)
    cgroup = BuildCgroup(root, "b1")
    cgroup.create(pids_max=123)
    assert (root / "pids" / PARENT / "b1" / "pids.max").read_text() == "123\n"
    assert cgroup.step_path == f"/{PARENT}/b1/step"
    (root / "pids" / PARENT / "b1" / "pids.max").unlink()  # a real cgroup dir has no removable files
    # The OCI runtime makes the step's parents in every hierarchy and leaves them behind.
    for hierarchy in ("memory", "cpu", "unified"):
        (root / hierarchy / PARENT / "b1").mkdir(parents=True)
    cgroup.remove()
    assert not any((root / hierarchy / PARENT).exists() for hierarchy in ("pids", "memory", "cpu", "unified"))


def test_a_build_cgroup_keeps_the_parent_other_builds_use(tmp_path: Path) -> None:
    root = fake_v1_root(tmp_path)
    (root / "pids" / PARENT / "other").mkdir(parents=True)
    cgroup = BuildCgroup(root, "b2")
    cgroup.create(pids_max=5)
    (root / "pids" / PARENT / "b2" / "pids.max").unlink()
    cgroup.remove()
    assert (root / "pids" / PARENT / "other").is_dir() and not (root / "pids" / PARENT / "b2").exists()


def test_a_build_cgroup_that_cannot_be_made_says_why(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")  # where a directory should be: mkdir fails
    with pytest.raises(BuildCgroupError, match="cannot make the build's cgroup"):
        BuildCgroup(tmp_path / "a-file", "b3").create(pids_max=5)
    BuildCgroup(tmp_path / "nowhere", "b4").remove()  # nothing made: nothing to do, no error


def test_build_cgroup_names_are_plain(tmp_path: Path) -> None:
    with pytest.raises(BuildCgroupError, match="plain name"):
        BuildCgroup(fake_v1_root(tmp_path), "../escape").create(pids_max=5)


def test_a_restarted_builder_sweeps_the_cgroups_a_stopped_one_left(tmp_path: Path) -> None:
    root = fake_v1_root(tmp_path)
    for hierarchy in ("pids", "memory"):
        (root / hierarchy / PARENT / "crashed" / "step").mkdir(parents=True)
    sweep_stale(root)
    assert not (root / "pids" / PARENT).exists() and not (root / "memory" / PARENT).exists()
    sweep_stale(tmp_path / "nowhere")  # no cgroup filesystem: nothing to do
