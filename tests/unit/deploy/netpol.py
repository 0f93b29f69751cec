"""A small offline evaluator of Kubernetes NetworkPolicies (networking.k8s.io/v1), for the reachability test.

network-config-analyzer pins PyYAML 6.0.2 (the project pins 6.0.4), so this implements the documented
semantics for what deploy/k8s uses: a pod is isolated for a direction when any policy selecting it lists that
direction in `policyTypes`; a connection is allowed when the source's egress and the destination's ingress
both allow it (non-isolated sides allow everything); peers are podSelector (the policy's namespace),
namespaceSelector (+ podSelector) and ipBlock (cidr less except); ports by number or by the destination's
port name, protocol TCP unless given. ipBlock is matched against pod IPs too (what Calico and Cilium do; the
API leaves it open), so an ipBlock rule cannot silently open the cluster.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Port:
    number: int
    protocol: str = "TCP"
    name: str = ""


@dataclass
class Endpoint:
    """A pod (or a stand-in for something outside: the internet, the Gateway's data plane, DNS)."""

    name: str
    namespace: str
    labels: dict[str, str]
    ip: str
    ports: list[Port] = field(default_factory=list)
    external: bool = False  # outside the cluster: no NetworkPolicy applies to it


def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(name) != value for name, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        name, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = name in labels
        if operator == "In" and not (present and labels[name] in values):
            return False
        if operator == "NotIn" and present and labels[name] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


class Evaluator:
    def __init__(self, policies: list[dict[str, Any]], namespaces: dict[str, dict[str, str]]) -> None:
        self.policies = policies
        self.namespaces = namespaces  # name -> labels

    def _selecting(self, endpoint: Endpoint, direction: str) -> list[dict[str, Any]]:
        if endpoint.external:
            return []
        return [
            policy
            for policy in self.policies
            if policy["metadata"]["namespace"] == endpoint.namespace
            and matches(policy["spec"]["podSelector"], endpoint.labels)
            and direction in policy["spec"].get("policyTypes", ["Ingress"])
        ]

    def _peer(self, peer: dict[str, Any], policy_namespace: str, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            address = ipaddress.ip_address(other.ip)
            block = peer["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
            )
        if other.external:
            return False
        if "namespaceSelector" in peer:
            if not matches(peer["namespaceSelector"], self.namespaces.get(other.namespace, {})):
                return False
        elif other.namespace != policy_namespace:
            return False
        return matches(peer.get("podSelector"), other.labels)

    @staticmethod
    def _port(rule_ports: list[dict[str, Any]] | None, port: Port) -> bool:
        if not rule_ports:
            return True
        for rule_port in rule_ports:
            if rule_port.get("protocol", "TCP") != port.protocol:
                continue
            wanted = rule_port.get("port")
            if wanted is None or wanted == port.number or (port.name and wanted == port.name):
                return True
        return False

    def _allows(self, endpoint: Endpoint, other: Endpoint, port: Port, direction: str) -> bool:
        policies = self._selecting(endpoint, direction)
        if not policies:
            return True
        peers_key, rules_key = ("to", "egress") if direction == "Egress" else ("from", "ingress")
        for policy in policies:
            for rule in policy["spec"].get(rules_key, []):
                peers = rule.get(peers_key)
                if peers and not any(self._peer(p, policy["metadata"]["namespace"], other) for p in peers):
                    continue
                if self._port(rule.get("ports"), port):
                    return True
        return False

    def allowed(self, source: Endpoint, destination: Endpoint, port: Port) -> bool:
        return self._allows(source, destination, port, "Egress") and self._allows(
            destination, source, port, "Ingress"
        )

    def matrix(self, endpoints: list[Endpoint]) -> dict[str, dict[str, list[str]]]:
        """source -> destination -> ["port/protocol", …] it may open (pairs with none left out)."""
        result: dict[str, dict[str, list[str]]] = {}
        for source in endpoints:
            for destination in endpoints:
                ports = [
                    f"{port.number}/{port.protocol}"
                    for port in destination.ports
                    if self.allowed(source, destination, port)
                ]
                if ports:
                    result.setdefault(source.name, {})[destination.name] = ports
        return result
