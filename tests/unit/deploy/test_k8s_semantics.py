"""What a schema cannot see in deploy/k8s, per overlay and component: selectors match labels, Services hit
real container ports, every reference resolves (ConfigMaps and their keys, Secrets the bootstrap Job or the
operator makes, ServiceAccounts, PVCs, Gateway routes), quantities parse with requests <= limits, every
container has requests, limits and probes, Deployments and StatefulSets have PDBs, no `latest` tags, no
literal secrets, every TIDEPOOL_* variable is a setting its service reads, and Pod Security: only the engine
and the runner are privileged, everything else meets `restricted`."""

from __future__ import annotations

import functools
import importlib.util
import re
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from tests.unit.deploy.k8s import (
    COMPUTE,
    CONTROL,
    components_of,
    containers,
    key,
    pod_spec,
    render,
    targets,
    workloads,
)
from tidepool_runtime import settings
from tidepool_stack import k8s_bootstrap

Docs = tuple[dict[str, Any], ...]


class NoSettings(BaseModel):
    pass


PRIVILEGED = {"engine", "runner"}  # DaemonSets in the compute namespace
# Secrets an operator creates (component README lines), by the component that needs them.
OPERATOR_SECRETS = {
    "tidepool-s3-backend": "object-storage-external",
    "tidepool-database": "postgres-external",
    "tidepool-gateway-tls": "gateway-api",
}
SETTINGS_OF = {
    "tidepool_api": settings.ApiSettings,
    "tidepool_scheduler": settings.SchedulerSettings,
    "tidepool_builder": settings.BuilderSettings,
    "tidepool_proxy": settings.ProxySettings,
    "tidepool_ssh_gateway": settings.SshGatewaySettings,
    "tidepool_telemetry": settings.TelemetrySettings,
    "tidepool_runner": settings.RunnerSettings,
    "tidepool_stack.s3_gateway": settings.ObjectStorageGatewaySettings,
    "tidepool_stack.bus_init": settings.CommonSettings,
    "tidepool_api.migrate": settings.DatabaseSettings,
    "tidepool_stack.k8s_bootstrap": NoSettings,  # talks to the Kubernetes API only
}
OFF_THE_BUS = {"tidepool_stack.s3_gateway", "tidepool_api.migrate", "tidepool_stack.k8s_bootstrap"}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}

per_target = pytest.mark.parametrize("target", targets())


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against labels."""
    if any(labels.get(name) != value for name, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        name, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": name in labels and labels[name] in values,
            "NotIn": name not in labels or labels[name] not in values,
            "Exists": name in labels,
            "DoesNotExist": name not in labels,
        }[operator]
        if not ok:
            return False
    return True


def pods(docs: Docs, namespace: str) -> list[dict[str, Any]]:
    return [doc for doc in workloads(docs) if doc["metadata"]["namespace"] == namespace]


def pods_budgets(docs: Docs, namespace: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["namespace"] == namespace]


def labels_of(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"].get("labels", {})


def bootstrap_args(docs: Docs) -> list[str]:
    (job,) = [doc for doc in docs if doc["kind"] == "Job" and doc["metadata"]["name"] == "bootstrap"]
    return job["spec"]["template"]["spec"]["containers"][0]["args"]


@functools.cache
def planned(postgres: bool, registry: bool) -> dict[tuple[str, str], dict[str, str]]:
    return k8s_bootstrap.plan({}, postgres=postgres, registry=registry)


def secret_keys(docs: Docs, target: str) -> dict[tuple[str, str], set[str] | None]:
    """(namespace, name) -> keys of every Secret that exists once the bootstrap Job has run (None: an
    operator's Secret, keys unknown here)."""
    args = bootstrap_args(docs)
    made = planned("--postgres" in args, "--registry" in args)
    result: dict[tuple[str, str], set[str] | None] = {name: set(data) for name, data in made.items()}
    for secret, component in OPERATOR_SECRETS.items():
        if component in components_of(target):
            result.setdefault((CONTROL, secret), None)
    return result


@per_target
def test_selectors_match_labels(target: str) -> None:
    docs = render(target)
    for doc in workloads(docs):
        if doc["kind"] != "Job":
            assert matches(doc["spec"]["selector"], labels_of(doc)), key(doc)
    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] == "Service":
            assert any(
                matches({"matchLabels": doc["spec"]["selector"]}, labels_of(w)) for w in pods(docs, namespace)
            ), key(doc)
        if doc["kind"] == "PodDisruptionBudget":
            assert any(matches(doc["spec"]["selector"], labels_of(w)) for w in pods(docs, namespace)), key(
                doc
            )
        if doc["kind"] == "NetworkPolicy" and doc["spec"]["podSelector"]:
            assert any(matches(doc["spec"]["podSelector"], labels_of(w)) for w in pods(docs, namespace)), key(
                doc
            )


@per_target
def test_services_hit_real_container_ports(target: str) -> None:
    docs = render(target)
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        namespace = service["metadata"]["namespace"]
        selected = [
            w
            for w in pods(docs, namespace)
            if matches({"matchLabels": service["spec"]["selector"]}, labels_of(w))
        ]
        for port in service["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            for workload in selected:
                ports = [p for c in containers(workload, init=False) for p in c.get("ports", [])]
                assert any(
                    p.get("name") == target_port or p["containerPort"] == target_port for p in ports
                ), f"{key(service)} port {target_port} is not a port of {key(workload)}"


@per_target
def test_every_reference_resolves(target: str) -> None:
    docs = render(target)
    objects = {(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc for doc in docs}
    secrets = secret_keys(docs, target)

    def config_map_keys(namespace: str, name: str) -> set[str]:
        assert ("ConfigMap", namespace, name) in objects, f"ConfigMap {namespace}/{name}"
        return set(objects[("ConfigMap", namespace, name)]["data"])

    def secret(namespace: str, name: str, needed: set[str] = frozenset()) -> None:
        assert (namespace, name) in secrets, f"Secret {namespace}/{name} is made by nobody ({target})"
        known = secrets[(namespace, name)]
        assert known is None or needed <= known, (
            f"Secret {namespace}/{name} lacks {needed - (known or set())}"
        )

    for doc in workloads(docs):
        namespace, spec = doc["metadata"]["namespace"], pod_spec(doc)
        assert ("ServiceAccount", namespace, spec["serviceAccountName"]) in objects, key(doc)
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                config_map_keys(namespace, volume["configMap"]["name"])
            if "secret" in volume:
                secret(namespace, volume["secret"]["secretName"])
            if "persistentVolumeClaim" in volume:
                name = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", namespace, name) in objects, f"{key(doc)}: PVC {name}"
        for container in containers(doc):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    config_map_keys(namespace, source["configMapRef"]["name"])
                else:
                    secret(namespace, source["secretRef"]["name"])
            for item in container.get("env", []):
                ref = item.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    secret(namespace, ref["secretKeyRef"]["name"], {ref["secretKeyRef"]["key"]})
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config_map_keys(
                        namespace, ref["configMapKeyRef"]["name"]
                    )
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{key(doc)}: {mount['name']}"
                volume = volumes.get(mount["name"], {})
                if "subPath" in mount and "configMap" in volume:
                    assert mount["subPath"] in config_map_keys(namespace, volume["configMap"]["name"])
                if "subPath" in mount and "secret" in volume:
                    secret(namespace, volume["secret"]["secretName"], {mount["subPath"]})
    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] == "RoleBinding":
            assert ("Role", namespace, doc["roleRef"]["name"]) in objects, key(doc)
            for subject in doc["subjects"]:
                assert ("ServiceAccount", subject["namespace"], subject["name"]) in objects, key(doc)
        if doc["kind"] == "HTTPRoute":
            for parent in doc["spec"]["parentRefs"]:
                gateway = objects[("Gateway", namespace, parent["name"])]
                assert parent["sectionName"] in {
                    listener["name"] for listener in gateway["spec"]["listeners"]
                }
            for rule in doc["spec"]["rules"]:
                for backend in rule["backendRefs"]:
                    service = objects[("Service", namespace, backend["name"])]
                    assert backend["port"] in {port["port"] for port in service["spec"]["ports"]}, key(doc)
        if doc["kind"] == "Gateway":
            for listener in doc["spec"]["listeners"]:
                for ref in listener.get("tls", {}).get("certificateRefs", []):
                    secret(namespace, ref["name"])
    # The NATS configuration includes the hashes file of the Secret mounted beside it.
    nats_conf = objects[
        (
            "ConfigMap",
            CONTROL,
            next(n for k, ns, n in objects if k == "ConfigMap" and n.startswith("nats-config")),
        )
    ]
    assert 'include "users/hashes.conf"' in nats_conf["data"]["nats.conf"]
    secret(CONTROL, "tidepool-nats-users", {"hashes.conf"})


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_FACTORS = {None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_FACTORS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> Decimal:
    match = _QUANTITY.match(str(text))
    assert match, f"not a quantity: {text!r}"
    return Decimal(match.group(1)) * _FACTORS[match.group(2)]


def test_quantity_parser() -> None:
    assert quantity("250m") == Decimal("0.25") and quantity("2") == 2 and quantity("1Gi") == 2**30
    with pytest.raises(AssertionError):
        quantity("1 GB")


@per_target
def test_resources_and_probes(target: str) -> None:
    docs = render(target)
    for doc in workloads(docs):
        for container in containers(doc):
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{key(doc)}/{container['name']} {resource}"
        if doc["kind"] == "Job":
            continue  # runs to completion: nothing to probe
        for container in containers(doc, init=False):
            # Which port and path: test_k8s_runtime_wiring (where each service really serves its probes).
            assert {"livenessProbe", "readinessProbe"} <= container.keys(), f"{key(doc)}/{container['name']}"
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pdbs = [
                pdb
                for pdb in pods_budgets(docs, doc["metadata"]["namespace"])
                if matches(pdb["spec"]["selector"], labels_of(doc))
            ]
            assert len(pdbs) == 1, key(doc)
            # maxUnavailable: a single replica never blocks a node drain for good.
            assert pdbs[0]["spec"].get("maxUnavailable") == 1, key(doc)
    replicas = {
        doc["metadata"]["name"]: doc["spec"].get("replicas") for doc in docs if doc["kind"] == "Deployment"
    }
    if target == "overlay/production":
        assert replicas["api"] >= 2 and replicas["proxy"] >= 2
        assert replicas["scheduler"] >= 2  # high availability by its lease


@per_target
def test_images_are_pinned_and_nothing_secret_is_literal(target: str) -> None:
    docs = render(target)
    assert not [key(doc) for doc in docs if doc["kind"] == "Secret"], "Secrets come from the bootstrap Job"
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|PRIVATE")
    for doc in workloads(docs):
        for container in containers(doc):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (name and tag and tag != "latest" and "/" not in tag), image
            for item in container.get("env", []):
                if secretish.search(item["name"]) and not item["name"].endswith("_FILE"):
                    assert "value" not in item, f"{key(doc)}: literal {item['name']}"
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            # A secret's name may hold only the path of a file (a mounted Secret's: test_k8s_runtime_wiring).
            literal = [n for n, v in doc["data"].items() if secretish.search(n) and not v.startswith("/etc/")]
            assert not literal, key(doc)
            assert "$2" not in str(doc["data"]), f"{key(doc)} holds a password hash"


def module_of(container: dict[str, Any]) -> str | None:
    command = container.get("command", [])
    return command[command.index("-m") + 1] if "-m" in command else None


def given_variables(docs: Docs, target: str, namespace: str, container: dict[str, Any]) -> set[str]:
    objects = {(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc for doc in docs}
    secrets = secret_keys(docs, target)
    given: set[str] = set()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            given |= set(objects[("ConfigMap", namespace, source["configMapRef"]["name"])]["data"])
        else:
            known = secrets[(namespace, source["secretRef"]["name"])]
            if known is None:  # an operator's Secret: its documented keys
                known = {
                    "TIDEPOOL_S3_BACKEND_" + k
                    for k in ("ENDPOINT", "BUCKET", "PREFIX", "ACCESS_KEY", "SECRET_KEY")
                }
                if source["secretRef"]["name"] == "tidepool-database":
                    known = {"TIDEPOOL_DATABASE_URL"}
            given |= known
    given |= {item["name"] for item in container.get("env", [])}
    return {name for name in given if name.startswith("TIDEPOOL_")}


@per_target
def test_every_tidepool_variable_is_a_setting_its_service_reads(target: str) -> None:
    docs = render(target)
    every_setting = {
        f"TIDEPOOL_{field.upper()}" for cls in SETTINGS_OF.values() for field in cls.model_fields
    }
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            unknown = {name for name in doc["data"] if name.startswith("TIDEPOOL_")} - every_setting
            assert not unknown, f"{key(doc)}: {sorted(unknown)}"
    seen = set()
    for doc in workloads(docs):
        for container in containers(doc, init=False):
            module = module_of(container)
            if module is None or not module.startswith("tidepool"):
                continue
            assert importlib.util.find_spec(module) is not None, module
            reads = {f"TIDEPOOL_{field.upper()}" for field in SETTINGS_OF[module].model_fields}
            given = given_variables(docs, target, doc["metadata"]["namespace"], container)
            assert given <= reads, f"{module} is given what it does not read: {sorted(given - reads)}"
            assert ("TIDEPOOL_NATS_URL" in given) != (module in OFF_THE_BUS), module
            seen.add(module)
    assert seen == set(SETTINGS_OF)


def secret_refs(doc: dict[str, Any]) -> set[str]:
    return {
        source["secretRef"]["name"]
        for c in containers(doc)
        for source in c.get("envFrom", [])
        if "secretRef" in source
    }


@per_target
def test_each_service_gets_only_its_own_credentials(target: str) -> None:
    docs = render(target)
    holders: dict[str, set[str]] = {}
    for doc in workloads(docs):
        for container in containers(doc, init=False):
            module = module_of(container)
            if module is None or not module.startswith("tidepool"):
                continue
            refs = secret_refs(doc)
            user = {"tidepool_stack.bus_init": "bus-init"}.get(
                module, module.removeprefix("tidepool_").replace("_", "-")
            )
            nats_logins = {ref for ref in refs if ref.startswith("tidepool-nats-")}
            assert nats_logins == (set() if module in OFF_THE_BUS else {f"tidepool-nats-{user}"}), module
            for ref in refs:
                holders.setdefault(ref, set()).add(module)
    assert holders["tidepool-signing-seal"] == {"tidepool_api", "tidepool_proxy"}
    assert holders["tidepool-registry-seal"] == {"tidepool_api", "tidepool_builder"}
    assert holders["tidepool-otel-seal"] == {"tidepool_api", "tidepool_telemetry"}
    assert holders["tidepool-registry"] == {"tidepool_builder", "tidepool_runner"}
    assert holders["tidepool-database"] == {"tidepool_api", "tidepool_api.migrate"}
    assert holders["tidepool-runner-token"] == {"tidepool_proxy", "tidepool_ssh_gateway", "tidepool_runner"}
    assert holders.get("tidepool-s3-backend", {"tidepool_stack.s3_gateway"}) == {"tidepool_stack.s3_gateway"}
    # The one pod with a Kubernetes API token is the bootstrap Job's.
    tokens = [
        key(doc) for doc in workloads(docs) if pod_spec(doc).get("automountServiceAccountToken") is not False
    ]
    assert tokens == ["Job.tidepool.bootstrap"]


def _restricted_violations(doc: dict[str, Any]) -> list[str]:
    """Pod Security `restricted` (v1.30) for one pod template."""
    spec, found = pod_spec(doc), []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(flag)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    pod = spec.get("securityContext", {})
    for container in containers(doc):
        context = container.get("securityContext", {})
        name = container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if not context.get("runAsNonRoot", pod.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot")
        if context.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccomp {seccomp}")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {
            "NET_BIND_SERVICE"
        }:
            found.append(f"{name}: capabilities")
        if any("hostPort" in port for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if not context.get("readOnlyRootFilesystem"):  # beyond `restricted`: the house rule
            found.append(f"{name}: writable root filesystem")
    return found


@per_target
def test_pod_security(target: str) -> None:
    docs = render(target)
    namespaces = {
        doc["metadata"]["name"]: doc["metadata"]["labels"] for doc in docs if doc["kind"] == "Namespace"
    }
    assert namespaces[CONTROL]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespaces[COMPUTE]["pod-security.kubernetes.io/enforce"] == "privileged"
    privileged = set()
    for doc in workloads(docs):
        namespace, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
        assert namespace in (CONTROL, COMPUTE), key(doc)
        if any(c.get("securityContext", {}).get("privileged") for c in containers(doc)):
            privileged.add(name)
        violations = _restricted_violations(doc)
        if name in PRIVILEGED:
            assert doc["kind"] == "DaemonSet" and namespace == COMPUTE
            assert not pod_spec(doc).get("hostNetwork") and not pod_spec(doc).get("hostPID")
        elif namespace == COMPUTE:
            # The builder: restricted but for the engine socket's folder on the node.
            assert violations == ["volume socket: ['hostPath']"], (key(doc), violations)
        else:
            assert violations == [], (key(doc), violations)
    assert privileged == PRIVILEGED


@per_target
def test_compute_runs_on_dedicated_nodes(target: str) -> None:
    docs = render(target)
    compute = {doc["metadata"]["name"]: doc for doc in pods(docs, COMPUTE)}
    assert set(compute) == {"engine", "runner", "builder"}
    for doc in compute.values():
        spec = pod_spec(doc)
        assert spec["nodeSelector"] == {"tidepool.io/compute": "true"}, key(doc)
        assert {"key": "tidepool.io/compute", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    assert compute["engine"]["spec"]["updateStrategy"] == {"type": "OnDelete"}
    for doc in pods(docs, CONTROL):
        assert "nodeSelector" not in pod_spec(doc), key(doc)
