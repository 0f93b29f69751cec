"""NATS users of the platform: one per service, each allowed only what `tidepool_contracts.access` gives it.

- `permissions(access, user)`: the publish/subscribe allow-lists of nats-server's authorization block for one
  service (its channels' subjects, the `$JS.API` subjects of its streams and KV buckets, `$KV.<bucket>.>`
  for a bucket it writes, and its own reply inbox `_INBOX_<user>.>`: no service sees another's replies).
- `server_config(...)`: a whole nats-server configuration (JSON, which nats-server reads) with every
  service's user and bcrypt-hashed password.
- `cluster_config(...)`: the same for one node of a 3-node JetStream cluster (routes, server name).
- `ensure_passwords(path)`: random passwords, generated once into a 0600 JSON file and then reused.

A service connects as `TIDEPOOL_NATS_USER` / `TIDEPOOL_NATS_PASSWORD` (`tidepool_runtime.broker`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bcrypt

from tidepool_contracts.access import SERVICE_ACCESS, Access
from tidepool_contracts.channels import Bucket, Stream

# High-entropy random passwords: the hash's cost guards nothing a brute force could find; keep logins cheap.
BCRYPT_ROUNDS = 10
PASSWORD_BYTES = 32
JS = "$JS.API"
VARIABLE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix of `user`'s connection (only it may subscribe below it); `_INBOX` without
    a user (an unauthenticated development server)."""
    return f"_INBOX_{user}" if user else "_INBOX"


def kv_stream(bucket: Bucket[Any]) -> str:
    """The JetStream stream holding a KV bucket."""
    return f"KV_{bucket.name}"


def _consume(stream: str) -> list[str]:
    """Everything a consumer of `stream` sends: creating (durable, ephemeral, ordered), inspecting and
    deleting its consumers, pulling, acking and answering flow control."""
    return [
        f"{JS}.CONSUMER.CREATE.{stream}",
        f"{JS}.CONSUMER.CREATE.{stream}.>",
        f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"{JS}.CONSUMER.INFO.{stream}.>",
        f"{JS}.CONSUMER.DELETE.{stream}.>",
        f"{JS}.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _declare(stream: str, *, create: bool, update: bool) -> list[str]:
    subjects = [f"{JS}.STREAM.INFO.{stream}"]
    if create:
        subjects.append(f"{JS}.STREAM.CREATE.{stream}")
    return [*subjects, f"{JS}.STREAM.UPDATE.{stream}"] if update else subjects


def permissions(access: Access, user: str, *, create_streams: bool = True) -> dict[str, Any]:
    """nats-server permissions of one service: `{"publish": {"allow": [...]}, "subscribe": {"allow": [...]},
    "allow_responses": bool}` (answering requests needs no publish right on the requester's inbox).

    `create_streams` False (deploy/k8s, where the bus-init Job makes every stream and bucket): no right to
    create any stream or bucket, nor to update a stream's configuration except one the service tunes from
    its own settings; the service only inspects them (`TIDEPOOL_BUS_CREATE_STREAMS=false`)."""
    publish: list[str] = [f"{JS}.INFO", f"{JS}.STREAM.NAMES"]
    stream: Stream
    for stream in access.streams:
        tuned = stream in access.tunes
        owner = access.owns_topology and create_streams
        publish += _declare(stream.name, create=create_streams, update=owner or tuned)
    for bucket in access.buckets:
        publish += _declare(kv_stream(bucket), create=create_streams, update=False)
    publish += [channel.filter for channel in access.publishes]
    for stream in {channel.stream for channel in access.consumes if channel.stream}:
        publish += _consume(stream.name)
    publish += [channel.subject for channel in access.requests]
    for bucket in access.reads:
        name = kv_stream(bucket)
        publish += [*_consume(name), f"{JS}.DIRECT.GET.{name}", f"{JS}.DIRECT.GET.{name}.>"]
        publish.append(f"{JS}.STREAM.MSG.GET.{name}")
    publish += [f"$KV.{bucket.name}.>" for bucket in access.writes]
    subscribe = [f"{inbox_prefix(user)}.>", *(channel.subject for channel in access.answers)]
    result: dict[str, Any] = {
        "publish": {"allow": sorted(set(publish))},
        "subscribe": {"allow": sorted(set(subscribe))},
    }
    if access.answers:
        # Only to the inbox of the request being answered, once, within a minute.
        result["allow_responses"] = {"max": 1, "expires": "1m"}
    return result


def _server(
    password_hashes: dict[str, str],
    *,
    host: str,
    port: int,
    store_dir: str,
    tls: dict[str, str] | None,
    create_streams: bool = True,
) -> dict[str, Any]:
    users = [
        {
            "user": service,
            "password": password_hashes[service],
            **permissions_for(service, create_streams=create_streams),
        }
        for service in SERVICE_ACCESS
        if service in password_hashes
    ]
    config: dict[str, Any] = {
        "host": host,
        "port": port,
        "jetstream": {"store_dir": store_dir},
        # With users and no `no_auth_user`, a connection without valid credentials is refused.
        "authorization": {"users": users},
    }
    if tls:
        config["tls"] = {**tls, "timeout": 5}
    return config


def server_config(
    password_hashes: dict[str, str],
    *,
    host: str,
    port: int,
    store_dir: str,
    tls: dict[str, str] | None = None,
) -> str:
    """A nats-server configuration (JSON) with JetStream and one user per service of `password_hashes`
    (service -> bcrypt hash). `tls`: {"cert_file", "key_file"} to serve TLS only."""
    config = _server(password_hashes, host=host, port=port, store_dir=store_dir, tls=tls)
    return json.dumps(config, indent=2) + "\n"


def cluster_config(
    password_hashes: dict[str, str],
    *,
    server_name: str,
    routes: list[str],
    route_user: str,
    route_password: str,
    host: str = "0.0.0.0",
    port: int = 4222,
    cluster_host: str = "0.0.0.0",
    cluster_port: int = 6222,
    monitor_port: int = 8222,
    store_dir: str = "/data/jetstream",
    cluster_name: str = "tidepool",
    tls: dict[str, str] | None = None,
    route_tls: dict[str, str] | None = None,
    create_streams: bool = True,
) -> str:
    """The configuration (JSON) of one node of a JetStream cluster, with the same per-service users and
    permissions as `server_config` (`create_streams` False: as deploy/k8s gives them, where only the
    bus-init Job creates streams). deploy/k8s's own file is `tidepool_stack.k8s_nats.render` (TLS routes,
    hashes from a Secret); tests/unit/deploy checks both give every service the same permissions.

    `server_name`: unique and stable per node (JetStream's RAFT identity, e.g. the pod name `nats-0`), or
    `$VARIABLE` to read it from the node's environment (one configuration for every pod of a StatefulSet:
    `$POD_NAME` from the downward API); the text is then nats-server's configuration format, not strict JSON.
    `routes`: every node's route URL, this one included (nats-server ignores itself), e.g.
    `nats-route://nats-0.nats.tidepool.svc:6222`; routes log in as `route_user` / `route_password` (the
    same on every node, a Secret's; written into the URLs). `monitor_port`: the HTTP monitor
    (`/healthz?js-enabled-only=true` is the node's probe; 0: none). `tls` as for `server_config`;
    `route_tls`: {"cert_file", "key_file", "ca_file"} to encrypt and verify routes.
    """
    config = _server(
        password_hashes, host=host, port=port, store_dir=store_dir, tls=tls, create_streams=create_streams
    )
    config["server_name"] = server_name
    login = f"{quote(route_user, safe='')}:{quote(route_password, safe='')}@"
    cluster: dict[str, Any] = {
        "name": cluster_name,
        "host": cluster_host,
        "port": cluster_port,
        "authorization": {"user": route_user, "password": route_password, "timeout": 5},
        "routes": [url.replace("://", f"://{login}", 1) for url in routes],
        # A node that lost its peers keeps retrying them (a pod restarting elsewhere).
        "connect_retries": 120,
    }
    if route_tls:
        cluster["tls"] = {**route_tls, "timeout": 5, "verify": True}
    config["cluster"] = cluster
    if monitor_port:
        config["http_port"] = monitor_port
    text = json.dumps(config, indent=2) + "\n"
    if VARIABLE.fullmatch(server_name):  # unquoted: nats-server resolves it from the environment
        text = text.replace(f'"server_name": "{server_name}"', f'"server_name": {server_name}', 1)
    return text


def permissions_for(service: str, *, create_streams: bool = True) -> dict[str, Any]:
    """`{"permissions": ...}` of a service of `SERVICE_ACCESS` (KeyError: unknown service);
    `create_streams` as for `permissions`."""
    return {"permissions": permissions(SERVICE_ACCESS[service], service, create_streams=create_streams)}


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def new_passwords() -> dict[str, str]:
    """A random password per service of `SERVICE_ACCESS`."""
    return {service: secrets.token_urlsafe(PASSWORD_BYTES) for service in SERVICE_ACCESS}


def ensure_passwords(path: Path) -> dict[str, str]:
    """Every service's password, from `path` (JSON service -> password, mode 0600), created or completed
    with random ones when missing; existing ones are kept, so a restart reuses them."""
    current: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    if all(service in current for service in SERVICE_ACCESS):
        return current
    fresh = {**new_passwords(), **current}
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(fresh, handle)
    os.replace(tmp, path)
    return fresh
