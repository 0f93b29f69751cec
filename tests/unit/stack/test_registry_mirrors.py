"""Registry mirrors (issue #15): the operator's `REGISTRY=MIRROR` list becomes the engines'
registries.conf."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tidepool_stack.supervisor import Stack, StackConfig, parse_registry_mirrors


def test_mirrors_parse_in_order_per_registry() -> None:
    parsed = parse_registry_mirrors("docker.io=127.0.0.1:5000, Docker.io=mirror.example/,quay.io=m2:443")
    assert parsed == {"docker.io": ["127.0.0.1:5000", "mirror.example"], "quay.io": ["m2:443"]}
    assert parse_registry_mirrors("") == {}


@pytest.mark.parametrize("bad", ["docker.io", "=m", "docker.io=", "docker.io/library=m", "a=b/c"])
def test_a_malformed_mirror_is_refused_with_its_entry(bad: str) -> None:
    with pytest.raises(ValueError, match="REGISTRY=MIRROR"):
        parse_registry_mirrors(bad)


def test_registries_conf_lists_mirrors_and_only_loopback_ones_are_plain_http(tmp_path: Path) -> None:
    mirrors = {"docker.io": ["127.0.0.1:5000", "mirror.example"]}
    stack = Stack(StackConfig(data_dir=tmp_path, registry_mirrors=mirrors))
    conf = tomllib.loads(stack.registries_conf("127.0.0.1:4999").read_text())
    own, docker = conf["registry"]
    assert own == {"location": "127.0.0.1:4999", "insecure": True}
    assert docker["prefix"] == docker["location"] == "docker.io"
    loopback, remote = docker["mirror"]
    assert loopback == {"location": "127.0.0.1:5000", "insecure": True}
    assert remote == {"location": "mirror.example"}
