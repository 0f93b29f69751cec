"""deploy/k8s against what the services really do at run time (issue #17), per overlay and component:

- probes reach the port where the service serves `/healthz` and `/readyz` — the API's own HTTP port, every
  other service's TIDEPOOL_HEALTH_PORT listener (tidepool_runtime.health), read from the service's code and
  its settings' defaults as overridden by the manifests; a process serving no probe (the object-storage
  gateway, rclone) is probed on its TCP port; every probe waits at least 3 s, and the API has a startupProbe;
- every secret a service reads at start (seal keys, tokens, passwords, the database URL) is given to it, since
  an empty one is generated per pod under its emptyDir (replicas would disagree, restarts would lose it);
- the services are told the NATS cluster's replica count and that they must not create streams (the bus-init
  Job does), and the NATS users of the cluster configuration have no right to create one;
- a metrics port, where one is set, is a declared container port on an address the scraper can reach.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from tests.unit.deploy.k8s import K8S, containers, key, render, targets, workloads
from tests.unit.deploy.test_k8s_semantics import OFF_THE_BUS, SETTINGS_OF, module_of, secret_keys
from tidepool_contracts.access import SERVICE_ACCESS
from tidepool_contracts.channels import BUCKETS, STREAMS
from tidepool_runtime import nats_auth
from tidepool_runtime.settings import CommonSettings
from tidepool_stack import k8s_bootstrap, k8s_nats

Docs = tuple[dict[str, Any], ...]
per_target = pytest.mark.parametrize("target", targets())
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# Settings that hold a secret: an empty value means one generated per pod (or an insecure default).
SECRET_FIELD = re.compile(r"(seal_key|secret_key|_token|password|host_key|database_url)$")
# Secret settings a service may go without, and why.
OPTIONAL_SECRETS = {
    # The gateway's external S3 login: only with the component object-storage-external, which gives it.
    ("tidepool_stack.s3_gateway", "s3_backend_secret_key"),
}
UNKNOWN = object()  # a value from a Secret: present, not known here


def sources(module: str) -> str:
    """The source text of a service: every file of its package (or the module's own file)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    origin = Path(spec.origin)
    files = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
    return "\n".join(path.read_text() for path in files)


def health_setting(module: str) -> str | None:
    """The settings field whose port the service answers the probes on, read from its code: the API's own
    port when it wraps its app in `Health.asgi`, `health_port` when it runs `serve_health`, else None."""
    text = sources(module)
    if "serve_health(" in text and "settings.health_port" in text:
        return "health_port"
    if re.search(r"\bhealth\.asgi\(", text):
        return "api_port"
    return None


def environment(docs: Docs, target: str, namespace: str, container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment as the manifests give it: ConfigMap values and literal `env` values;
    a Secret's keys map to UNKNOWN."""
    objects = {(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc for doc in docs}
    secrets = secret_keys(docs, target)
    result: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            result |= objects[("ConfigMap", namespace, source["configMapRef"]["name"])]["data"]
        else:
            known = secrets[(namespace, source["secretRef"]["name"])]
            if known is None:  # an operator's Secret: its documented keys (test_k8s_semantics)
                known = (
                    {"TIDEPOOL_DATABASE_URL"}
                    if source["secretRef"]["name"] == "tidepool-database"
                    else {
                        "TIDEPOOL_S3_BACKEND_" + k
                        for k in ("ENDPOINT", "BUCKET", "PREFIX", "ACCESS_KEY", "SECRET_KEY")
                    }
                )
            result |= dict.fromkeys(known, UNKNOWN)
    for item in container.get("env", []):
        result[item["name"]] = item.get("value", UNKNOWN)
    return result


def setting(module: str, env: dict[str, Any], field: str) -> Any:
    """A setting's value in the container: the manifests' value, else the settings class's default."""
    info = SETTINGS_OF[module].model_fields[field]
    value = env.get(f"TIDEPOOL_{field.upper()}")
    if value is None:
        return info.default
    return value if value is UNKNOWN else TypeAdapter(info.annotation).validate_python(value)


def tidepool_containers(docs: Docs) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    return [
        (doc, container, module)
        for doc in workloads(docs)
        for container in containers(doc, init=False)
        if (module := module_of(container) or "").startswith("tidepool")
    ]


def test_health_ports_are_read_from_the_code() -> None:
    assert health_setting("tidepool_api") == "api_port"
    for module in ("tidepool_scheduler", "tidepool_proxy", "tidepool_runner", "tidepool_ssh_gateway"):
        assert health_setting(module) == "health_port", module
    assert health_setting("tidepool_stack.s3_gateway") is None


@per_target
def test_probes_reach_the_port_health_is_served_on(target: str) -> None:
    docs = render(target)
    for doc in workloads(docs):
        for container in containers(doc, init=False):
            for probe in PROBES:
                if probe in container:
                    assert container[probe].get("timeoutSeconds", 1) >= 3, f"{key(doc)} {probe}"
    seen = set()
    for doc, container, module in tidepool_containers(docs):
        if doc["kind"] == "Job":
            continue
        seen.add(module)
        where = f"{key(doc)}/{container['name']}"
        env = environment(docs, target, doc["metadata"]["namespace"], container)
        declared = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
        field = health_setting(module)
        for probe in PROBES:
            assert probe in container, f"{where}: no {probe}"
            spec = container[probe]
            if field is None:  # no HTTP probe is served: the listening port is the check
                port = spec["tcpSocket"]["port"]
                port = declared.get(port, port)
                assert port in declared.values(), f"{where} {probe}: port {port} is not declared"
                continue
            get = spec["httpGet"]
            assert get["path"] == ("/readyz" if probe == "readinessProbe" else "/healthz"), f"{where} {probe}"
            port = declared.get(get["port"], get["port"])
            assert port in declared.values(), f"{where} {probe}: port {get['port']} is not a container port"
            served = setting(module, env, field)
            assert served and port == served, f"{where} {probe}: probes port {port}, health is on {served}"
            if field == "health_port":
                assert setting(module, env, "health_host") == "0.0.0.0", where
        if module == "tidepool_api":
            assert "startupProbe" in container, where
    assert {"tidepool_api", "tidepool_proxy", "tidepool_runner", "tidepool_stack.s3_gateway"} <= seen


@per_target
def test_every_secret_a_service_reads_is_given(target: str) -> None:
    docs = render(target)
    for doc, container, module in tidepool_containers(docs):
        env = environment(docs, target, doc["metadata"]["namespace"], container)
        for field in SETTINGS_OF[module].model_fields:
            if not SECRET_FIELD.search(field) or (module, field) in OPTIONAL_SECRETS:
                continue
            if field.startswith("nats_") and module in OFF_THE_BUS:
                continue
            value = env.get(f"TIDEPOOL_{field.upper()}")
            assert value is not None, f"{key(doc)} ({module}) is not given {field}"
            if isinstance(value, str):  # a file's path (no literal secret: test_k8s_semantics): a Secret's
                assert secret_file(doc, container, value), f"{key(doc)}: {field} {value} is no Secret's file"


def secret_file(doc: dict[str, Any], container: dict[str, Any], path: str) -> bool:
    """Whether `path` is a key of a Secret volume mounted into the container, and the Secret has that key."""
    volumes = {volume["name"]: volume for volume in doc["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        folder, _, name = path.rpartition("/")
        volume = volumes.get(mount["name"], {})
        if folder == mount["mountPath"].rstrip("/") and "secret" in volume:
            planned = k8s_bootstrap.plan({}, postgres=False, registry=False)
            return name in planned.get((doc["metadata"]["namespace"], volume["secret"]["secretName"]), {})
    return False


@per_target
def test_services_use_the_clusters_streams_and_create_none(target: str) -> None:
    docs = render(target)
    nats = [doc for doc in docs if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "nats"]
    (statefulset,) = nats
    replicas = statefulset["spec"]["replicas"]
    (bus_init,) = [doc for doc in workloads(docs) if doc["metadata"]["name"] == "bus-init"]
    command = bus_init["spec"]["template"]["spec"]["containers"][0]["command"]
    assert int(command[command.index("--replicas") + 1]) == replicas
    for doc, container, module in tidepool_containers(docs):
        if module in OFF_THE_BUS or module == "tidepool_stack.bus_init":
            continue
        env = environment(docs, target, doc["metadata"]["namespace"], container)
        assert setting(module, env, "nats_replicas") == replicas, f"{key(doc)}: TIDEPOOL_NATS_REPLICAS"
        assert setting(module, env, "bus_create_streams") is False, f"{key(doc)}: TIDEPOOL_BUS_CREATE_STREAMS"


def test_no_nats_user_of_the_cluster_but_bus_init_may_create_streams() -> None:
    text = (K8S / "base" / "nats" / "nats.conf").read_text()
    assert text == k8s_nats.render()
    names = [stream.name for stream in STREAMS] + [nats_auth.kv_stream(bucket) for bucket in BUCKETS]
    for user in k8s_nats.users():
        permissions = (
            k8s_nats.bus_init_permissions()
            if user == k8s_nats.BUS_INIT
            else nats_auth.permissions_for(user, create_streams=False)["permissions"]
        )
        allowed = permissions["publish"]["allow"]
        creates = [subject for subject in allowed if subject.startswith("$JS.API.STREAM.CREATE")]
        creates += [subject for subject in allowed if subject in ("$JS.API.>", "$JS.API.STREAM.>", ">")]
        if user == k8s_nats.BUS_INIT:
            assert sorted(creates) == sorted(f"$JS.API.STREAM.CREATE.{name}" for name in names)
            continue
        assert creates == [], user
        access = SERVICE_ACCESS[user]
        updates = {s.removeprefix("$JS.API.STREAM.UPDATE.") for s in allowed if ".STREAM.UPDATE." in s}
        assert updates == {stream.name for stream in access.tunes}, user  # only what it tunes
        for stream in access.streams:  # it may still check that its streams and buckets exist
            assert f"$JS.API.STREAM.INFO.{stream.name}" in allowed, user
        for bucket in access.buckets:
            assert f"$JS.API.STREAM.INFO.{nats_auth.kv_stream(bucket)}" in allowed, user
        assert f'"user": "{user}"' in text


def test_the_single_machine_keeps_creating_its_streams() -> None:
    assert CommonSettings.model_fields["bus_create_streams"].default is True
    for user, access in SERVICE_ACCESS.items():
        allowed = nats_auth.permissions_for(user)["permissions"]["publish"]["allow"]
        for stream in access.streams:
            assert f"$JS.API.STREAM.CREATE.{stream.name}" in allowed, user


@per_target
def test_a_metrics_port_is_declared_and_reachable(target: str) -> None:
    docs = render(target)
    seen = set()
    for doc, container, module in tidepool_containers(docs):
        env = environment(docs, target, doc["metadata"]["namespace"], container)
        if "metrics_port" not in SETTINGS_OF[module].model_fields or "run_service(" not in sources(module):
            continue  # tidepool_runtime.process.run_service serves /metrics; one-shot Jobs do not
        seen.add(module)
        port = setting(module, env, "metrics_port")
        if not port:
            continue
        declared = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
        assert declared.get(port) == "metrics", f"{key(doc)}: metrics port {port} is not declared"
        assert setting(module, env, "metrics_host") == "0.0.0.0", f"{key(doc)}: metrics on loopback"
    assert "tidepool_runner" in seen and "tidepool_api" in seen
