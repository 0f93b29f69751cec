"""The bootstrap Job (tidepool_stack.k8s_bootstrap): it creates every missing Secret, one per consumer, never
overwrites a value, completes a Secret that lacks a key, keeps derived Secrets (NATS hashes, htpasswd) true to
their sources, and a second run changes nothing. Against a fake Kubernetes API (httpx.MockTransport)."""

from __future__ import annotations

import base64
import functools
import json

import asyncssh
import bcrypt
import httpx

from tidepool_stack import k8s_bootstrap, k8s_nats
from tidepool_stack.k8s_bootstrap import COMPUTE, CONTROL


@functools.cache
def fresh() -> dict[tuple[str, str], dict[str, str]]:
    return k8s_bootstrap.plan({}, postgres=True, registry=True)


def test_a_fresh_cluster_gets_every_secret_consistent() -> None:
    made = fresh()
    assert set(made) == set(k8s_bootstrap.secret_names(postgres=True, registry=True))
    hashes = k8s_bootstrap._parse_hashes(made[(CONTROL, "tidepool-nats-users")]["hashes.conf"])
    for user in k8s_nats.users():
        namespace = COMPUTE if user in ("runner", "builder") else CONTROL
        login = made[(namespace, f"tidepool-nats-{user.replace('_', '-')}")]
        assert login["TIDEPOOL_NATS_USER"] == user
        assert bcrypt.checkpw(login["TIDEPOOL_NATS_PASSWORD"].encode(), hashes[user].encode())
    passwords = {data.get("TIDEPOOL_NATS_PASSWORD") for data in made.values()} - {None}
    assert len(passwords) == len(k8s_nats.users())  # one each
    for name in ("tidepool-registry-seal", "tidepool-s3", "tidepool-runner-token", "tidepool-nats-ca"):
        assert made[(CONTROL, name)] == made[(COMPUTE, name)], name
    assert made[(CONTROL, "tidepool-nats-ca")]["ca.crt"] == made[(CONTROL, "tidepool-nats-tls")]["ca.crt"]
    password = made[(CONTROL, "tidepool-postgres")]["POSTGRES_PASSWORD"]
    assert (
        f":{password}@postgres.tidepool.svc:5432/"
        in made[(CONTROL, "tidepool-database")]["TIDEPOOL_DATABASE_URL"]
    )
    # The SSH gateway's host key, as it reads it (asyncssh), the same for every replica.
    host_key = made[(CONTROL, "tidepool-ssh-host-key")][k8s_bootstrap.SSH_HOST_KEY]
    assert asyncssh.import_private_key(host_key).algorithm == b"ssh-ed25519"
    assert made[(CONTROL, "tidepool-otel-seal")]["TIDEPOOL_OTEL_SEAL_KEY"]
    login = made[(COMPUTE, "tidepool-registry")]
    user, _, hashed = made[(CONTROL, "tidepool-registry-htpasswd")]["htpasswd"].strip().partition(":")
    assert user == login["TIDEPOOL_REGISTRY_USERNAME"]
    assert bcrypt.checkpw(login["TIDEPOOL_REGISTRY_PASSWORD"].encode(), hashed.encode())


def test_a_second_run_changes_nothing_and_existing_values_win() -> None:
    existing = {name: dict(data) for name, data in fresh().items()}
    assert k8s_bootstrap.plan(existing, postgres=True, registry=True) == fresh()
    # An operator's own value stays; a Secret missing a key gets only that key.
    existing[(CONTROL, "tidepool-secret-key")] = {"TIDEPOOL_SECRET_KEY": "chosen-by-the-operator"}
    existing[(COMPUTE, "tidepool-registry")] = {"TIDEPOOL_REGISTRY_USERNAME": "ops"}
    again = k8s_bootstrap.plan(existing, postgres=True, registry=True)
    assert again[(CONTROL, "tidepool-secret-key")] == {"TIDEPOOL_SECRET_KEY": "chosen-by-the-operator"}
    assert again[(COMPUTE, "tidepool-registry")]["TIDEPOOL_REGISTRY_USERNAME"] == "ops"
    # The htpasswd follows the login it derives from.
    user, _, hashed = again[(CONTROL, "tidepool-registry-htpasswd")]["htpasswd"].strip().partition(":")
    assert user == "ops"
    assert bcrypt.checkpw(
        again[(COMPUTE, "tidepool-registry")]["TIDEPOOL_REGISTRY_PASSWORD"].encode(), hashed.encode()
    )


def test_a_recreated_login_gets_its_hash_again() -> None:
    existing = {name: dict(data) for name, data in fresh().items()}
    del existing[(CONTROL, "tidepool-nats-proxy")]  # an operator deleted it to rotate the password
    again = k8s_bootstrap.plan(existing, postgres=True, registry=True)
    new_password = again[(CONTROL, "tidepool-nats-proxy")]["TIDEPOOL_NATS_PASSWORD"]
    assert new_password != fresh()[(CONTROL, "tidepool-nats-proxy")]["TIDEPOOL_NATS_PASSWORD"]
    hashes = k8s_bootstrap._parse_hashes(again[(CONTROL, "tidepool-nats-users")]["hashes.conf"])
    assert bcrypt.checkpw(new_password.encode(), hashes["proxy"].encode())


class FakeApi:
    """Secrets in memory behind the Kubernetes REST paths the bootstrap uses; records every call."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.calls: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")  # api v1 namespaces NS secrets [NAME]
        namespace, name = parts[3], (parts[5] if len(parts) > 5 else None)
        self.calls.append(f"{request.method} {namespace}/{name or ''}")
        if request.method == "GET":
            data = self.secrets.get((namespace, name))
            if data is None:
                return httpx.Response(404, json={"kind": "Status", "code": 404})
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            return httpx.Response(200, json={"data": encoded})
        body = json.loads(request.content)
        if request.method == "POST":
            key = (namespace, body["metadata"]["name"])
            if key in self.secrets:
                return httpx.Response(409)
            self.secrets[key] = dict(body["stringData"])
            return httpx.Response(201, json=body)
        if request.method == "PATCH":
            assert request.headers["content-type"] == "application/merge-patch+json"
            self.secrets[(namespace, name)].update(body["stringData"])
            return httpx.Response(200, json={})
        return httpx.Response(405)


def test_apply_creates_then_leaves_everything_alone() -> None:
    fake = FakeApi()
    client = httpx.Client(
        base_url="https://kubernetes.default.svc", transport=httpx.MockTransport(fake.handle)
    )
    api = k8s_bootstrap.Api(client)
    first = k8s_bootstrap.apply(api, postgres=False, registry=True)
    assert len(first) == len(k8s_bootstrap.secret_names(postgres=False, registry=True))
    assert all(line.startswith("created ") for line in first)
    snapshot = {name: dict(data) for name, data in fake.secrets.items()}
    fake.calls.clear()
    assert k8s_bootstrap.apply(api, postgres=False, registry=True) == []
    assert fake.secrets == snapshot
    assert {call.split()[0] for call in fake.calls} == {"GET"}
    # A key an operator removed comes back; the rest of that Secret is kept.
    del fake.secrets[(CONTROL, "tidepool-s3")]["TIDEPOOL_S3_SECRET_KEY"]
    fake.secrets[(CONTROL, "tidepool-s3")]["other"] = "kept"
    assert k8s_bootstrap.apply(api, postgres=False, registry=True) == [
        "updated tidepool/tidepool-s3: ['TIDEPOOL_S3_SECRET_KEY']"
    ]
    assert fake.secrets[(CONTROL, "tidepool-s3")]["other"] == "kept"
    # …with the value the compute namespace's copy still has: the two never differ.
    assert (
        fake.secrets[(CONTROL, "tidepool-s3")]["TIDEPOOL_S3_SECRET_KEY"]
        == snapshot[(COMPUTE, "tidepool-s3")]["TIDEPOOL_S3_SECRET_KEY"]
    )
