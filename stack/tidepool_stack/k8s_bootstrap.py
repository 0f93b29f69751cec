"""The bootstrap Job of deploy/k8s: creates every missing Secret, one per consumer, and never overwrites one.

`python -m tidepool_stack.k8s_bootstrap [--postgres] [--registry]` runs in the cluster with its service
account (Role `tidepool-bootstrap`: get/create/patch Secrets in the control-plane and compute namespaces).
Each Secret is made from what already exists: a key already present keeps its value, a missing key is added
(PATCH), a missing Secret is created (POST). Derived values (the NATS users' bcrypt hashes, the database URL,
the registry's htpasswd, the copies the compute namespace needs) are computed from the values in place, so a
re-run after a partial failure converges and a re-run after success changes nothing.

`plan(existing)` is the pure part (tests/unit/deploy/test_k8s_bootstrap.py); `main()` the Kubernetes API
client. Never logs a value.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import httpx

from tidepool_runtime import nats_auth
from tidepool_stack import k8s_nats
from tidepool_stack.k8s_secrets import nats_tls, ssh_host_key

CONTROL = "tidepool"
COMPUTE = "tidepool-compute"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
COMPUTE_USERS = ("runner", "builder")
SSH_HOST_KEY = "ssh_host_ed25519_key"

Data = dict[str, str]
Existing = dict[tuple[str, str], Data]  # (namespace, name) -> decoded data


def _token() -> str:
    return secrets.token_urlsafe(32)


def _nats_secret_name(user: str) -> str:
    return f"tidepool-nats-{user.replace('_', '-')}"  # Kubernetes names have no `_`


def plan(existing: Existing, *, postgres: bool, registry: bool) -> dict[tuple[str, str], Data]:
    """(namespace, name) -> the whole data each Secret must end with, given `existing` (never changed): a
    Secret that has all its keys stays as it is, missing keys are generated or derived from what exists.
    Derived Secrets (NATS hashes, htpasswd) are remade only when they no longer match their source."""
    result: dict[tuple[str, str], Data] = {}

    def ensure(namespace: str, name: str, keys: tuple[str, ...], make: Callable[[], Data]) -> Data:
        current = existing.get((namespace, name), {})
        merged = current if set(keys) <= set(current) else {**make(), **current}  # what is there wins
        result[(namespace, name)] = merged
        return merged

    def derive(namespace: str, name: str, valid: Callable[[Data], bool], make: Callable[[], Data]) -> Data:
        current = existing.get((namespace, name), {})
        result[(namespace, name)] = data = current if current and valid(current) else make()
        return data

    passwords: dict[str, str] = {}
    for user in k8s_nats.users():
        namespace = COMPUTE if user in COMPUTE_USERS else CONTROL
        data = ensure(
            namespace,
            _nats_secret_name(user),
            ("TIDEPOOL_NATS_USER", "TIDEPOOL_NATS_PASSWORD"),
            lambda user=user: {"TIDEPOOL_NATS_USER": user, "TIDEPOOL_NATS_PASSWORD": _token()},
        )
        passwords[user] = data["TIDEPOOL_NATS_PASSWORD"]

    def hashes_match(data: Data) -> bool:
        hashes = _parse_hashes(data.get("hashes.conf", ""))
        return set(hashes) == set(passwords) and all(_verifies(passwords[u], hashes[u]) for u in passwords)

    derive(
        CONTROL,
        "tidepool-nats-users",
        hashes_match,
        lambda: {
            "hashes.conf": k8s_nats.hashes_conf(
                {user: nats_auth.hash_password(password) for user, password in passwords.items()}
            )
        },
    )
    tls = ensure(CONTROL, "tidepool-nats-tls", ("ca.crt", "tls.crt", "tls.key"), lambda: nats_tls(CONTROL))
    for namespace in (CONTROL, COMPUTE):
        ensure(namespace, "tidepool-nats-ca", ("ca.crt",), lambda: {"ca.crt": tls["ca.crt"]})

    def shared(name: str, key: str, namespaces: tuple[str, ...], value: Callable[[], str]) -> Data:
        # One value in every namespace: the first existing copy's, else a new one.
        present = [existing[(ns, name)][key] for ns in namespaces if key in existing.get((ns, name), {})]
        chosen = present[0] if present else value()
        datas = [ensure(namespace, name, (key,), lambda: {key: chosen}) for namespace in namespaces]
        return datas[0]

    both = (CONTROL, COMPUTE)
    shared("tidepool-signing-seal", "TIDEPOOL_SIGNING_SEAL_KEY", (CONTROL,), _token)
    shared("tidepool-otel-seal", "TIDEPOOL_OTEL_SEAL_KEY", (CONTROL,), _token)
    shared("tidepool-registry-seal", "TIDEPOOL_REGISTRY_SEAL_KEY", both, _token)
    shared("tidepool-secret-key", "TIDEPOOL_SECRET_KEY", (CONTROL,), _token)
    shared("tidepool-s3", "TIDEPOOL_S3_SECRET_KEY", both, lambda: secrets.token_hex(20))
    shared("tidepool-runner-token", "TIDEPOOL_RUNNER_TOKEN", both, _token)
    # A file (TIDEPOOL_SSH_GATEWAY_HOST_KEY names it): one host key for every replica, kept across restarts.
    ensure(CONTROL, "tidepool-ssh-host-key", (SSH_HOST_KEY,), lambda: {SSH_HOST_KEY: ssh_host_key()})

    if postgres:
        pg = shared("tidepool-postgres", "POSTGRES_PASSWORD", (CONTROL,), _token)
        url = f"postgresql+asyncpg://tidepool:{pg['POSTGRES_PASSWORD']}@postgres.{CONTROL}.svc:5432/tidepool"
        ensure(
            CONTROL, "tidepool-database", ("TIDEPOOL_DATABASE_URL",), lambda: {"TIDEPOOL_DATABASE_URL": url}
        )
    if registry:
        login = ensure(
            COMPUTE,
            "tidepool-registry",
            ("TIDEPOOL_REGISTRY_USERNAME", "TIDEPOOL_REGISTRY_PASSWORD"),
            lambda: {"TIDEPOOL_REGISTRY_USERNAME": "tidepool", "TIDEPOOL_REGISTRY_PASSWORD": _token()},
        )
        user, password = login["TIDEPOOL_REGISTRY_USERNAME"], login["TIDEPOOL_REGISTRY_PASSWORD"]

        def htpasswd_matches(data: Data) -> bool:
            name, _, hashed = data.get("htpasswd", "").strip().partition(":")
            return name == user and _verifies(password, hashed)

        derive(
            CONTROL,
            "tidepool-registry-htpasswd",
            htpasswd_matches,
            lambda: {"htpasswd": f"{user}:{nats_auth.hash_password(password)}\n"},
        )
    return result


def _verifies(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:  # not a bcrypt hash
        return False


def _parse_hashes(text: str) -> dict[str, str]:
    """users/hashes.conf -> user -> bcrypt hash (the inverse of `k8s_nats.hashes_conf`)."""
    by_variable = {k8s_nats.hash_variable(user): user for user in k8s_nats.users()}
    hashes = {}
    for line in text.splitlines():
        variable, _, value = line.partition(":")
        if variable.strip() in by_variable and value.strip().startswith('"'):
            hashes[by_variable[variable.strip()]] = value.strip().strip('"')
    return hashes


class Api:
    """The few Secret calls the bootstrap needs, on the in-cluster API with the pod's service account."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def read(self, namespace: str, name: str) -> Data | None:
        response = self.client.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return {
            key: base64.b64decode(value).decode()
            for key, value in (response.json().get("data") or {}).items()
        }

    def create(self, namespace: str, name: str, data: Data) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "tidepool"},
            },
            "type": "Opaque",
            "stringData": data,
        }
        self.client.post(f"/api/v1/namespaces/{namespace}/secrets", json=body).raise_for_status()

    def add_keys(self, namespace: str, name: str, data: Data) -> None:
        self.client.patch(
            f"/api/v1/namespaces/{namespace}/secrets/{name}",
            json={"stringData": data},
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()


def secret_names(*, postgres: bool, registry: bool) -> list[tuple[str, str]]:
    """Every (namespace, name) the bootstrap manages; the manifests reference only these."""
    names = [
        (COMPUTE if user in COMPUTE_USERS else CONTROL, _nats_secret_name(user)) for user in k8s_nats.users()
    ]
    names += [(CONTROL, "tidepool-nats-users"), (CONTROL, "tidepool-nats-tls")]
    names += [(ns, "tidepool-nats-ca") for ns in (CONTROL, COMPUTE)]
    names += [
        (CONTROL, "tidepool-signing-seal"),
        (CONTROL, "tidepool-otel-seal"),
        (CONTROL, "tidepool-secret-key"),
        (CONTROL, "tidepool-ssh-host-key"),
    ]
    names += [
        (ns, name)
        for name in ("tidepool-registry-seal", "tidepool-s3", "tidepool-runner-token")
        for ns in (CONTROL, COMPUTE)
    ]
    if postgres:
        names += [(CONTROL, "tidepool-postgres"), (CONTROL, "tidepool-database")]
    if registry:
        names += [(COMPUTE, "tidepool-registry"), (CONTROL, "tidepool-registry-htpasswd")]
    return names


def apply(api: Api, *, postgres: bool, registry: bool) -> list[str]:
    """Create or complete the Secrets; returns one line per change ("created ns/name", "added keys …")."""
    existing: Existing = {}
    for namespace, name in secret_names(postgres=postgres, registry=registry):
        current = api.read(namespace, name)
        if current is not None:
            existing[(namespace, name)] = current
    changes = []
    for (namespace, name), data in plan(existing, postgres=postgres, registry=registry).items():
        old = existing.get((namespace, name))
        if old is None:
            api.create(namespace, name, data)
            changes.append(f"created {namespace}/{name}")
        elif data != old:
            api.add_keys(
                namespace, name, {key: value for key, value in data.items() if old.get(key) != value}
            )
            changes.append(f"updated {namespace}/{name}: {sorted(k for k in data if old.get(k) != data[k])}")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", action="store_true", help="also the in-cluster PostgreSQL's Secrets")
    parser.add_argument("--registry", action="store_true", help="also the in-cluster registry's login")
    args = parser.parse_args(argv)
    token = (SA_DIR / "token").read_text()
    with httpx.Client(
        base_url="https://kubernetes.default.svc",
        verify=str(SA_DIR / "ca.crt"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ) as client:
        for line in apply(Api(client), postgres=args.postgres, registry=args.registry):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
