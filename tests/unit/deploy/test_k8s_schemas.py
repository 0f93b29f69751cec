"""Every overlay and every component of deploy/k8s renders (`kubectl kustomize`) and validates strictly (no
unknown field) against Kubernetes 1.30 and the newest schema kubernetes-validate ships; the Gateway API
objects against the vendored CRD schemas (deploy/k8s/tests/schemas)."""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import major_minor, schema_contents
from referencing import Registry, Resource

from tests.unit.deploy.k8s import TESTS_DIR, render, targets

VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {("gateway.networking.k8s.io/v1", "Gateway"), ("gateway.networking.k8s.io/v1", "HTTPRoute")}


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server prunes and `kubectl --validate=strict`
    refuses them."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = TESTS_DIR / "schemas" / f"gateway.networking.k8s.io_v1_{kind.lower()}.json"
    schema = _strict(json.loads(path.read_text()))
    # apiVersion/kind/metadata are the API server's; the CRD schema leaves metadata open.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@functools.cache
def k8s_validator(version: str, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """kubernetes_validate.validate's strict validator, built once per schema (it reloads the definitions
    on every call, seconds per overlay)."""
    schema_version = [v for v in kubernetes_validate.utils.all_versions() if v <= major_minor(version)][-1]
    folder = f"kubernetes-json-schema/v{schema_version}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = schema_contents(f"{folder}/{kind.lower()}-{group}.json", version)
    definitions = schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("target", targets())
def test_renders_and_validates_strictly(target: str) -> None:
    docs = render(target)
    assert docs, target
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            jsonschema.validate(doc, crd_schema(doc["kind"]))
            continue
        for version in VERSIONS:
            errors = list(k8s_validator(version, doc["apiVersion"], doc["kind"]).iter_errors(doc))
            assert not errors, f"{target} {doc['kind']}/{doc['metadata']['name']} ({version}): {errors[0]}"
    assert {"Namespace", "StatefulSet", "DaemonSet", "Deployment", "Job", "NetworkPolicy"} <= kinds


def test_strict_validation_catches_an_unknown_field() -> None:
    doc = copy.deepcopy(next(d for d in render("overlay/production") if d["kind"] == "Deployment"))
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert list(k8s_validator("1.30.0", doc["apiVersion"], doc["kind"]).iter_errors(doc))
    route = copy.deepcopy(next(d for d in render("overlay/production") if d["kind"] == "HTTPRoute"))
    route["spec"]["rules"][0]["backendRefs"][0]["prot"] = 80
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, crd_schema("HTTPRoute"))
