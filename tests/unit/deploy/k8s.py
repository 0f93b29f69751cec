"""Rendering deploy/k8s for the tests: every overlay, and the base with each component alone.

`kubectl kustomize` (the machine image's kubectl; kustomize v5) renders; results are cached per process, so
the tests of this folder render each target once.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "deploy" / "k8s"
TESTS_DIR = K8S / "tests"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
COMPONENTS = sorted(path.name for path in (K8S / "components").iterdir() if path.is_dir())
CONTROL, COMPUTE = "tidepool", "tidepool-compute"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# An installation has exactly one component of each of these; a component is rendered with the first of
# every other choice, so each target is a whole installation.
CHOICES = (("postgres", "postgres-external"), ("object-storage-pvc", "object-storage-external"))


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is needed to render deploy/k8s (scripts/setup-host.sh, deploy/k8s/README.md)"
    return found


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def render_overlay(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(K8S / "overlays" / name))


@functools.cache
def render_component(name: str) -> tuple[dict[str, Any], ...]:
    """The base with this component, completed by the first of each other choice (`CHOICES`)."""
    chosen = [name] + [choice[0] for choice in CHOICES if name not in choice]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    # kustomize takes relative paths only
                    "resources": [os.path.relpath(K8S / "base", tmp)],
                    "components": [os.path.relpath(K8S / "components" / c, tmp) for c in chosen],
                }
            )
        )
        return tuple(_kustomize(Path(tmp)))


def targets() -> list[str]:
    return [f"overlay/{name}" for name in OVERLAYS] + [f"component/{name}" for name in COMPONENTS]


def render(target: str) -> tuple[dict[str, Any], ...]:
    kind, _, name = target.partition("/")
    return render_overlay(name) if kind == "overlay" else render_component(name)


def components_of(target: str) -> set[str]:
    """The components a target includes."""
    kind, _, name = target.partition("/")
    if kind == "component":
        return {name} | {choice[0] for choice in CHOICES if name not in choice}
    kustomization = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())
    return {Path(path).name for path in kustomization.get("components", [])}


def key(doc: dict[str, Any]) -> str:
    """`Kind.namespace.name`, as checkov names resources."""
    return f"{doc['kind']}.{doc['metadata'].get('namespace', 'default')}.{doc['metadata']['name']}"


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] not in WORKLOAD_KINDS:
        return None
    return doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    return [*spec["containers"], *(spec.get("initContainers", []) if init else [])]


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]
