"""The Kubernetes manifests parse and start modules that exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents() -> list[dict]:
    docs: list[dict] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_every_manifest_is_a_kubernetes_object() -> None:
    for doc in documents():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml"}


def test_workloads_run_real_service_modules_unprivileged() -> None:
    for doc in documents():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            module = container["command"][-1]
            assert importlib.util.find_spec(module) is not None, module
            assert not container.get("securityContext", {}).get("privileged", False)


def test_only_builder_and_runner_get_the_registry_login() -> None:
    secrets = {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == "Secret"}
    login = secrets["tidepool-registry"]["stringData"]
    assert set(login) == {"TIDEPOOL_REGISTRY_USERNAME", "TIDEPOOL_REGISTRY_PASSWORD"}
    assert not any(name.startswith("TIDEPOOL_REGISTRY_") for name in secrets["tidepool"]["stringData"])
    holders = set()
    for doc in documents():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            refs = {source.get("secretRef", {}).get("name") for source in container.get("envFrom", [])}
            if "tidepool-registry" in refs:
                holders.add(container["command"][-1])
    assert holders == {"tidepool_builder", "tidepool_runner"}
