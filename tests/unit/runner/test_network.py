"""The sandbox network's engine definition, the check of an existing one, and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidepool_runner.network import SandboxNetworkError, check_network, network_config
from tidepool_runtime.settings import Settings


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def test_network_config_names_the_bridge_and_subnet(tmp_path: Path) -> None:
    config = network_config(make_settings(tmp_path))
    assert config["Name"] == "tidepool-sandboxes"
    assert config["Driver"] == "bridge"
    assert config["Options"] == {"com.docker.network.bridge.name": "tidepool0"}
    assert config["IPAM"] == {"Config": [{"Subnet": "10.90.0.0/16"}]}
    assert config["Labels"]["tidepool.bridge"] == "tidepool0"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sandbox_network": ""}, "TIDEPOOL_SANDBOX_NETWORK "),
        ({"sandbox_network_subnet": "10.90.0.0/33"}, "not a network address"),
        ({"sandbox_network_subnet": "10.90.0.1/16"}, "not a network address"),
        ({"sandbox_network_subnet": "fd00:90::/64"}, "IPv4"),
        ({"sandbox_network_bridge": "br; rm -rf /"}, "interface name"),
        ({"sandbox_network_bridge": "x" * 16}, "interface name"),
    ],
)
def test_unusable_network_settings_are_refused(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(SandboxNetworkError, match=message):
        network_config(make_settings(tmp_path, **overrides))


def inspect_document(bridge_label: str | None, subnet: str, options: dict[str, str] | None = None) -> dict:
    labels = {} if bridge_label is None else {"tidepool.bridge": bridge_label}
    return {"Labels": labels, "Options": options or {}, "IPAM": {"Config": [{"Subnet": subnet}]}}


def test_existing_network_must_match_bridge_and_subnet(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    check_network(inspect_document("tidepool0", "10.90.0.0/16"), settings)  # Podman: the label
    docker = inspect_document(None, "10.90.0.0/16", {"com.docker.network.bridge.name": "tidepool0"})
    check_network(docker, settings)  # Docker reports the option itself
    for wrong in (
        inspect_document("cni-podman1", "10.90.0.0/16"),
        inspect_document(None, "10.90.0.0/16"),  # not created by a runner: bridge unknown
        inspect_document("tidepool0", "10.89.0.0/24"),
    ):
        with pytest.raises(SandboxNetworkError, match="podman network rm tidepool-sandboxes"):
            check_network(wrong, settings)


def test_list_settings_accept_commas_or_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDEPOOL_SANDBOX_ALLOWED_CIDRS", " 10.1.0.0/16, fd00:1::/64 ,")
    monkeypatch.setenv("TIDEPOOL_SANDBOX_DNS_SERVERS", '["192.168.1.53", "192.168.1.54"]')
    monkeypatch.setenv("TIDEPOOL_SANDBOX_ALLOW_INTER_SANDBOX", "true")
    settings = Settings(data_dir=tmp_path)
    assert settings.sandbox_allowed_cidrs == ["10.1.0.0/16", "fd00:1::/64"]
    assert settings.sandbox_dns_servers == ["192.168.1.53", "192.168.1.54"]
    assert settings.sandbox_allow_inter_sandbox is True
    monkeypatch.setenv("TIDEPOOL_SANDBOX_ALLOWED_CIDRS", "")
    assert Settings(data_dir=tmp_path).sandbox_allowed_cidrs == []
    description = Settings.model_fields["sandbox_allowed_cidrs"].description
    assert description is not None and "Widen on purpose" in description
