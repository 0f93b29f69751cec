"""The Kubernetes manifests parse, start modules that exist, and give each service only what it reads."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import yaml

from tidepool_runtime import settings
from tidepool_stack.k8s_secrets import k8s_secrets

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents() -> list[dict]:
    docs: list[dict] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@functools.cache
def generated_secrets() -> list[dict]:
    """The Secrets `tidepool k8s-secrets` makes (not in the manifests: re-applying those must not reset
    them)."""
    return [doc for doc in yaml.safe_load_all(k8s_secrets()) if doc]


def envfrom_secrets() -> dict[str, set[str]]:
    """service module -> the Secrets its container takes its environment from."""
    holders: dict[str, set[str]] = {}
    for doc in documents():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            refs = {
                source["secretRef"]["name"]
                for source in container.get("envFrom", [])
                if "secretRef" in source
            }
            holders[container["command"][-1]] = refs
    return holders


def test_each_service_gets_its_own_nats_login_and_only_its_sealing_keys() -> None:
    generated = {doc["metadata"]["name"] for doc in generated_secrets()}
    for module, refs in envfrom_secrets().items():
        service = module.removeprefix("tidepool_").replace("_", "-")  # Kubernetes names have no `_`
        if module in OFF_THE_BUS:
            assert not [ref for ref in refs if ref.startswith("tidepool-nats-") or ref.endswith("-seal")], (
                module
            )
            continue
        assert {ref for ref in refs if ref.startswith("tidepool-nats-")} == {f"tidepool-nats-{service}"}
        assert f"tidepool-nats-{service}" in generated
        assert ("tidepool-signing-seal" in refs) == (service in ("api", "proxy")), module
        assert ("tidepool-registry-seal" in refs) == (service in ("api", "builder")), module
        assert ("tidepool-otel-seal" in refs) == (service in ("api", "telemetry")), module


def test_nats_serves_the_generated_config_and_certificate_over_tls() -> None:
    generated = {doc["metadata"]["name"]: doc["stringData"] for doc in generated_secrets()}
    (nats,) = [
        doc for doc in documents() if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "nats"
    ]
    volumes = {volume["name"]: volume for volume in nats["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["secret"]["secretName"] == "tidepool-nats-config"
    assert volumes["tls"]["secret"]["secretName"] == "tidepool-nats-tls"
    config = generated["tidepool-nats-config"]["nats.conf"]
    assert '"cert_file": "/etc/nats/tls/tls.crt"' in config and "$2" in config
    common = next(doc for doc in documents() if doc["metadata"]["name"] == "tidepool-common")["data"]
    assert common["TIDEPOOL_NATS_URL"].startswith("tls://")


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
    for name, secret in secrets.items():
        if name != "tidepool-registry":
            assert not any(key.startswith("TIDEPOOL_REGISTRY_") for key in secret["stringData"]), name
    holders = set()
    for doc in documents():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            refs = {source.get("secretRef", {}).get("name") for source in container.get("envFrom", [])}
            if "tidepool-registry" in refs:
                holders.add(container["command"][-1])
    assert holders == {"tidepool_builder", "tidepool_runner"}


SETTINGS_OF = {
    "tidepool_api": settings.ApiSettings,
    "tidepool_scheduler": settings.SchedulerSettings,
    "tidepool_builder": settings.BuilderSettings,
    "tidepool_proxy": settings.ProxySettings,
    "tidepool_ssh_gateway": settings.SshGatewaySettings,
    "tidepool_telemetry": settings.TelemetrySettings,
    "tidepool_runner": settings.RunnerSettings,
    "tidepool_stack.s3_gateway": settings.ObjectStorageGatewaySettings,
}
OFF_THE_BUS = {"tidepool_stack.s3_gateway"}  # the object-storage gateway needs no NATS


def test_each_workload_gets_only_the_settings_its_service_reads() -> None:
    data = {
        (doc["kind"], doc["metadata"]["name"]): doc.get("data") or doc.get("stringData") or {}
        for doc in [*documents(), *generated_secrets()]
        if doc["kind"] in ("ConfigMap", "Secret")
    }
    seen = set()
    for doc in documents():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            module = container["command"][-1]
            given: set[str] = set()
            for source in container.get("envFrom", []):
                kind, ref = (
                    ("ConfigMap", source["configMapRef"])
                    if "configMapRef" in source
                    else ("Secret", source["secretRef"])
                )
                given |= set(data[(kind, ref["name"])])
            given |= {
                item["name"] for item in container.get("env", []) if item["name"].startswith("TIDEPOOL_")
            }
            reads = {f"TIDEPOOL_{field.upper()}" for field in SETTINGS_OF[module].model_fields}
            assert given <= reads, f"{module} is given what it does not read: {sorted(given - reads)}"
            assert ("TIDEPOOL_NATS_URL" in given) != (module in OFF_THE_BUS), module
            seen.add(module)
    assert seen == set(SETTINGS_OF)


def test_only_the_object_storage_gateway_gets_the_external_s3_key_pair() -> None:
    holders = set()
    for doc in documents():
        if doc["kind"] == "Secret" and doc["metadata"]["name"] != "tidepool-s3-backend":
            assert not any(key.startswith("TIDEPOOL_S3_BACKEND_") for key in doc["stringData"]), doc
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            refs = {source.get("secretRef", {}).get("name") for source in container.get("envFrom", [])}
            if "tidepool-s3-backend" in refs:
                holders.add(container["command"][-1])
    assert holders == {"tidepool_stack.s3_gateway"}
