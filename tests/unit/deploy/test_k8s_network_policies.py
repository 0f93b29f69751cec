"""NetworkPolicy reachability of each overlay, computed offline (tests/unit/deploy/netpol.py), equals the
checked-in matrix deploy/k8s/tests/reachability.yaml; and, whatever the matrix says, sandboxes (the engine's
pod, whose address their traffic leaves with) reach neither NATS, PostgreSQL, the API nor anything else of the
platform but the registry, and only the API and the migrate Job reach PostgreSQL.

Regenerate the matrix after a deliberate change: `python -m tests.unit.deploy.test_k8s_network_policies`.
"""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.unit.deploy.k8s import OVERLAYS, TESTS_DIR, pod_spec, render_overlay, workloads
from tests.unit.deploy.netpol import Endpoint, Evaluator, Port, matches

MATRIX = TESTS_DIR / "reachability.yaml"
GATEWAY_NAMESPACE = "gateway-system"
MONITORING_NAMESPACE = "monitoring"  # labeled tidepool.io/metrics-scraper=true by the operator (README)
# Stand-ins for what is not in the manifests. Pod addresses come from 10.244.0.0/16.
OUTSIDE = [
    Endpoint(
        "gateway-data-plane",
        GATEWAY_NAMESPACE,
        {"app": "envoy"},
        "10.244.200.1",
        [Port(8080)],
    ),
    Endpoint(
        "kube-dns", "kube-system", {"k8s-app": "kube-dns"}, "10.244.200.2", [Port(53, "UDP"), Port(53, "TCP")]
    ),
    Endpoint("other-app", "default", {"app": "other"}, "10.244.200.3", [Port(8080)]),
    Endpoint("metrics-scraper", MONITORING_NAMESPACE, {"app": "prometheus"}, "10.244.200.4", [Port(9090)]),
    Endpoint("kube-apiserver", "", {}, "10.0.0.1", [Port(443), Port(6443)], external=True),
    Endpoint("internet", "", {}, "203.0.113.10", [Port(443), Port(80)], external=True),
    Endpoint("cloud-metadata", "", {}, "169.254.169.254", [Port(80)], external=True),
    Endpoint("external-postgres", "", {}, "10.0.50.10", [Port(5432)], external=True),
]
PLATFORM = {
    "nats",
    "postgres",
    "api",
    "proxy",
    "ssh-gateway",
    "scheduler",
    "telemetry",
    "s3-gateway",
    "runner",
}


def endpoints(overlay: str) -> tuple[Evaluator, list[Endpoint]]:
    docs = render_overlay(overlay)
    namespaces = {
        doc["metadata"]["name"]: doc["metadata"].get("labels", {})
        | {"kubernetes.io/metadata.name": doc["metadata"]["name"]}
        for doc in docs
        if doc["kind"] == "Namespace"
    }
    namespaces[GATEWAY_NAMESPACE] = {
        "kubernetes.io/metadata.name": GATEWAY_NAMESPACE,
        "tidepool.io/gateway": "true",
    }
    namespaces[MONITORING_NAMESPACE] = {
        "kubernetes.io/metadata.name": MONITORING_NAMESPACE,
        "tidepool.io/metrics-scraper": "true",
    }
    namespaces["kube-system"] = {"kubernetes.io/metadata.name": "kube-system"}
    namespaces["default"] = {"kubernetes.io/metadata.name": "default"}
    pods = []
    for index, doc in enumerate(workloads(docs)):
        ports = [
            Port(port["containerPort"], port.get("protocol", "TCP"), port.get("name", ""))
            for container in pod_spec(doc)["containers"]
            for port in container.get("ports", [])
        ]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        pods.append(
            Endpoint(
                doc["metadata"]["name"], doc["metadata"]["namespace"], labels, f"10.244.0.{index + 10}", ports
            )
        )
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    return Evaluator(policies, namespaces), pods + OUTSIDE


def compute_matrix() -> dict[str, dict[str, dict[str, list[str]]]]:
    result = {}
    outside = {point.name for point in OUTSIDE}
    for overlay in OVERLAYS:
        evaluator, points = endpoints(overlay)
        # Only edges that touch a pod of the platform: the stand-ins' traffic among themselves is not ours.
        result[overlay] = {
            source: row
            for source, destinations in evaluator.matrix(points).items()
            if (
                row := {
                    d: ports for d, ports in destinations.items() if source not in outside or d not in outside
                }
            )
        }
    return result


def test_reachability_equals_the_checked_in_matrix() -> None:
    expected = yaml.safe_load(MATRIX.read_text())
    assert compute_matrix() == expected, (
        "regenerate with python -m tests.unit.deploy.test_k8s_network_policies"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sandboxes_reach_nothing_of_the_platform(overlay: str) -> None:
    evaluator, points = endpoints(overlay)
    by_name = {point.name: point for point in points}
    engine = by_name["engine"]
    reached = {
        point.name for point in points for port in point.ports if evaluator.allowed(engine, point, port)
    }
    assert not reached & (PLATFORM | {"kube-apiserver", "cloud-metadata", "other-app", "builder"}), reached
    assert {"internet", "kube-dns", "registry"} <= reached
    # Nothing reaches into the engine's pod (the sandboxes).
    assert not [p.name for p in points for port in engine.ports if evaluator.allowed(p, engine, port)]
    ours = [point for point in points if point not in OUTSIDE]  # the world outside reaching it is not ours
    into_postgres = {
        point.name
        for point in ours
        for target in ("postgres", "external-postgres")
        if target in by_name
        for port in by_name[target].ports
        if evaluator.allowed(point, by_name[target], port)
    }
    assert into_postgres == {"api", "migrate"}, into_postgres
    into_nats = {
        point.name
        for point in points
        for port in by_name["nats"].ports[:1]
        if evaluator.allowed(point, by_name["nats"], port)
    }
    assert into_nats == {
        "api",
        "scheduler",
        "proxy",
        "ssh-gateway",
        "telemetry",
        "bus-init",
        "runner",
        "builder",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_open_to_the_scraper_alone(overlay: str) -> None:
    """Every `metrics` port (TIDEPOOL_METRICS_PORT) is reached by the scraper's namespace and nothing else."""
    evaluator, points = endpoints(overlay)
    exposing = [(point, port) for point in points for port in point.ports if port.name == "metrics"]
    assert {point.name for point, _ in exposing} >= {"api", "scheduler", "proxy", "runner", "builder"}
    for point, port in exposing:
        reached_from = {source.name for source in points if evaluator.allowed(source, point, port)}
        assert reached_from == {"metrics-scraper"}, (point.name, reached_from)


def test_the_evaluator_applies_default_deny_and_allow_rules() -> None:
    deny = {"metadata": {"namespace": "a"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    allow = {
        "metadata": {"namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "sql"}]}
            ],
        },
    }
    out = {
        "metadata": {"namespace": "a"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"], "egress": [{}]},
    }
    web = Endpoint("web", "a", {"app": "web"}, "10.244.0.1", [Port(80)])
    db = Endpoint("db", "a", {"app": "db"}, "10.244.0.2", [Port(5432, name="sql"), Port(22)])
    evaluator = Evaluator([deny, allow, out], {"a": {}})
    assert evaluator.allowed(web, db, db.ports[0]) and not evaluator.allowed(web, db, db.ports[1])
    assert not evaluator.allowed(db, web, web.ports[0])
    assert not Evaluator([deny, allow], {"a": {}}).allowed(web, db, db.ports[0])  # web's egress denied
    assert matches({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["1"]}]}, {})


if __name__ == "__main__":
    MATRIX.write_text(
        "# NetworkPolicy reachability per overlay: source -> destination -> ports (tests/unit/deploy).\n"
        "# Generated by `python -m tests.unit.deploy.test_k8s_network_policies`; review every change.\n"
        + yaml.safe_dump(compute_matrix(), sort_keys=True)
    )
    sys.exit(0)
