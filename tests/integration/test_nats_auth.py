"""The bus trusts no process it cannot authenticate, and each service only with its own part of the bus.

A real nats-server runs with the configuration the stack generates (`tidepool_runtime.nats_auth`): every
service connects as its own user and declares what it uses; a process without a login is refused; a
service's login can neither read another's secrets buckets nor publish on another's channels.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError, TimeoutError

from tests.conftest import free_port, nats_binary, wait_for_port, watch_server
from tests.polling import wait_until_async
from tidepool_contracts import channels
from tidepool_contracts.access import SERVICE_ACCESS
from tidepool_contracts.models import (
    ApiKeyRecord,
    RegistryCredentialsReply,
    RegistryCredentialsRequest,
    SandboxIntent,
    SandboxRoute,
    SandboxSpec,
    SigningKeyRecord,
    SshAccessGrant,
    utc_now,
)
from tidepool_runtime import nats_auth
from tidepool_runtime.broker import (
    Bus,
    connect,
    jetstream_subscriber,
    kv_get,
    kv_put,
    replay_subscriber,
    reply_subscriber,
)
from tidepool_runtime.process import die_with_parent
from tidepool_stack import k8s_nats
from tidepool_stack.k8s_secrets import k8s_secrets


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(url, service -> password) of a nats-server configured as the stack configures its own."""
    directory = tmp_path_factory.mktemp("nats-auth")
    passwords = nats_auth.ensure_passwords(directory / "nats-credentials.json")
    hashes = {service: nats_auth.hash_password(password) for service, password in passwords.items()}
    port = free_port()
    config = directory / "nats.conf"
    config.write_text(
        nats_auth.server_config(hashes, host="127.0.0.1", port=port, store_dir=str(directory / "store"))
    )
    process = subprocess.Popen(
        [nats_binary(), "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    stop_watching = watch_server(process, "nats-server (auth)")
    try:
        wait_for_port(port)
        yield f"nats://127.0.0.1:{port}", passwords
    finally:
        stop_watching()
        process.terminate()
        process.wait(timeout=10)


def intent(sandbox_id: str, action: str) -> SandboxIntent:
    spec = SandboxSpec(sandbox_id=sandbox_id, organization_id="org-1", image="alpine")
    return SandboxIntent(sandbox_id=sandbox_id, organization_id="org-1", action=action, spec=spec)  # type: ignore[arg-type]


async def service_bus(url: str, passwords: dict[str, str], service: str) -> Bus:
    access = SERVICE_ACCESS[service]
    return await connect(
        url,
        f"test-{service}",
        (*access.publishes, *access.requests),
        access=access,
        user=service,
        password=passwords[service],
    )


class Raw:
    """A plain nats-py connection that records the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Client | None = None

    async def open(self, url: str, **login: Any) -> Client:
        async def on_error(error: Exception) -> None:
            self.errors.append(str(error))

        if login.get("user"):  # the reply inbox its user may subscribe to
            login["inbox_prefix"] = nats_auth.inbox_prefix(login["user"])
        self.nc = await nats.connect(
            url,
            error_cb=on_error,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
            **login,
        )
        return self.nc

    async def denied(self, subject: str, kind: str = "publish") -> None:
        """Wait for the server's refusal of `kind` (publish, subscription) on `subject`."""
        await wait_until_async(
            lambda: any(
                f'permissions violation for {kind} to "{subject.lower()}"' in e.lower() for e in self.errors
            ),
            f"no permission violation for {subject}: {self.errors}",
        )


@pytest.fixture
async def buses(secured: tuple[str, dict[str, str]]) -> AsyncIterator[dict[str, Bus]]:
    url, passwords = secured
    opened: dict[str, Bus] = {}
    try:
        # Any service may start first: the proxy (only reads) declares its buckets on an empty server.
        for service in ("proxy", "runner", "telemetry", "builder", "scheduler", "api"):
            opened[service] = await service_bus(url, passwords, service)
        yield opened
    finally:
        for bus in opened.values():
            await bus.close()


async def test_a_process_without_a_login_is_refused(secured: tuple[str, dict[str, str]]) -> None:
    url, passwords = secured
    for login in ({}, {"user": "runner", "password": "wrong"}, {"user": "nobody", "password": "x"}):
        with pytest.raises((NoServersError, NatsError, OSError)):
            await Raw().open(url, **login)
    raw = Raw()
    nc = await raw.open(url, user="runner", password=passwords["runner"])
    await nc.close()


async def test_each_service_connects_and_works_within_its_access(buses: dict[str, Bus]) -> None:
    api, proxy, runner = buses["api"], buses["proxy"], buses["runner"]
    record = SigningKeyRecord(sandbox_id="sb-1", organization_id="org-1", key="k" * 43)
    await kv_put(await api.kv(channels.SIGNING_KEYS), "sb-1", record)
    read = await kv_get(await proxy.kv(channels.SIGNING_KEYS), "sb-1", SigningKeyRecord)
    assert read is not None and read.key == record.key
    route = SandboxRoute(
        sandbox_id="sb-1",
        organization_id="org-1",
        runner_id="r1",
        runner_url="http://127.0.0.1:1",
        state="started",
    )
    await kv_put(await runner.kv(channels.ROUTES), "sb-1", route)
    assert await kv_get(await proxy.kv(channels.ROUTES), "sb-1", SandboxRoute) == route
    await api.publish(channels.SANDBOX_INTENTS, intent("sb-1", "create"), sandbox_id="sb-1")
    with pytest.raises(PermissionError):
        await runner.kv(channels.API_KEYS)


@pytest.mark.parametrize(
    ("service", "bucket"),
    [
        ("runner", channels.API_KEYS),
        ("runner", channels.SIGNING_KEYS),
        ("builder", channels.SIGNING_KEYS),
        ("scheduler", channels.API_KEYS),
        ("telemetry", channels.SIGNING_KEYS),
        ("proxy", channels.DESIRED),
    ],
)
async def test_a_service_cannot_read_another_services_bucket(
    secured: tuple[str, dict[str, str]], buses: dict[str, Bus], service: str, bucket: channels.Bucket[Any]
) -> None:
    url, passwords = secured
    api = buses["api"]
    if bucket is channels.API_KEYS:
        secret = ApiKeyRecord(key_id="k1", organization_id="org-1")
        await kv_put(await api.kv(channels.API_KEYS), "h" * 64, secret)
    raw = Raw()
    nc = await raw.open(url, user=service, password=passwords[service])
    try:
        stream = nats_auth.kv_stream(bucket)
        js = nc.jetstream(timeout=2)
        get = f"$JS.API.STREAM.MSG.GET.{stream}"
        with pytest.raises(TimeoutError):
            await js.get_msg(stream, subject=f"$KV.{bucket.name}.x")
        await raw.denied(get)
        with pytest.raises(TimeoutError):
            await js.get_msg(stream, subject=f"$KV.{bucket.name}.x", direct=True)
        await raw.denied(f"$JS.API.DIRECT.GET.{stream}.$KV.{bucket.name}.x")
        with pytest.raises(TimeoutError):
            await js.subscribe(f"$KV.{bucket.name}.>", stream=stream, ordered_consumer=True)
        await raw.denied(f"$JS.API.CONSUMER.CREATE.{stream}")
        # Nor eavesdrop: not on the bucket's subjects, nor on the replies other services get.
        others = [nats_auth.inbox_prefix(other) + ".>" for other in SERVICE_ACCESS if other != service]
        for subject in (f"$KV.{bucket.name}.>", "_INBOX.>", *others, ">"):
            await nc.subscribe(subject)
            await raw.denied(subject, "subscription")
    finally:
        await nc.close()


async def test_the_proxy_cannot_publish_intents_nor_write_keys(
    secured: tuple[str, dict[str, str]], buses: dict[str, Bus]
) -> None:
    url, passwords = secured
    api = buses["api"]
    before = (await api.jetstream.stream_info(channels.INTENTS.name)).state.messages
    raw = Raw()
    nc = await raw.open(url, user="proxy", password=passwords["proxy"])
    try:
        forged_intent = intent("sb-x", "destroy").model_dump_json().encode()
        await nc.publish(channels.SANDBOX_INTENTS.address(sandbox_id="sb-x"), forged_intent)
        await raw.denied(channels.SANDBOX_INTENTS.address(sandbox_id="sb-x"))
        forged = ApiKeyRecord(key_id="forged", organization_id="org-victim")
        await nc.publish(f"$KV.{channels.API_KEYS.name}.{'f' * 64}", forged.model_dump_json().encode())
        await raw.denied(f"$KV.{channels.API_KEYS.name}.{'f' * 64}")
        await nc.flush()
    finally:
        await nc.close()
    assert (await api.jetstream.stream_info(channels.INTENTS.name)).state.messages == before
    assert await kv_get(await api_keys_reader(buses), "f" * 64, ApiKeyRecord) is None


async def test_the_ssh_gateway_cannot_forge_ssh_tokens(
    secured: tuple[str, dict[str, str]], buses: dict[str, Bus]
) -> None:
    """It only reads `tidepool_ssh_access`: a token it wrote itself would open any sandbox."""
    url, passwords = secured
    raw = Raw()
    nc = await raw.open(url, user="ssh_gateway", password=passwords["ssh_gateway"])
    subject = f"$KV.{channels.SSH_ACCESS.name}.{'f' * 64}"
    try:
        forged = SshAccessGrant(sandbox_id="sb-victim", organization_id="org-victim", expires_at=utc_now())
        await nc.publish(subject, forged.model_dump_json().encode())
        await raw.denied(subject)
        await nc.flush()
    finally:
        await nc.close()
    assert await kv_get(await buses["api"].kv(channels.SSH_ACCESS), "f" * 64, SshAccessGrant) is None


async def api_keys_reader(buses: dict[str, Bus]) -> Any:
    return await buses["proxy"].kv(channels.API_KEYS)


async def test_the_runner_cannot_take_build_jobs_nor_answer_credential_requests(
    secured: tuple[str, dict[str, str]], buses: dict[str, Bus]
) -> None:
    url, passwords = secured
    raw = Raw()
    nc = await raw.open(url, user="runner", password=passwords["runner"])
    try:
        await nc.subscribe(channels.REGISTRY_CREDENTIALS.subject)
        await raw.denied(channels.REGISTRY_CREDENTIALS.subject, "subscription")
        await nc.publish(channels.BUILD_JOBS.subject, b"{}")
        await raw.denied(channels.BUILD_JOBS.subject)
        with pytest.raises(TimeoutError):
            await nc.jetstream(timeout=2).add_stream(name="STOLEN", subjects=["_INBOX_builder.>"])
        await raw.denied("$JS.API.STREAM.CREATE.STOLEN")
    finally:
        await nc.close()


def arrival(event: asyncio.Event, token: str) -> Callable[[dict[str, str]], Awaitable[None]]:
    async def on_message(body: dict[str, str]) -> None:
        if body.get("token") == token:
            event.set()

    return on_message


async def test_what_each_service_consumes_reaches_it_from_its_publisher(
    secured: tuple[str, dict[str, str]], buses: dict[str, Bus]
) -> None:
    """Every consumed channel, through the same subscriber helpers the services use, under the consumer's
    login, from a publisher with the publishing service's login; and the builder's request reaches the API's
    responder and its answer comes back."""
    url, passwords = secured
    token = uuid.uuid4().hex
    arrived: dict[str, asyncio.Event] = {}
    for service, access in SERVICE_ACCESS.items():
        for index, channel in enumerate(access.consumes):
            key = f"{service}:{channel.subject}"
            arrived[key] = asyncio.Event()

            on_message = arrival(arrived[key], token)

            if service == "telemetry":
                replay_subscriber(buses[service].broker, channel, service=f"test-{token}")(on_message)
            else:
                durable = f"test-{service}-{index}-{token}"
                jetstream_subscriber(buses[service].broker, channel, durable=durable)(on_message)

    @reply_subscriber(buses["api"].broker, channels.REGISTRY_CREDENTIALS, queue="api")
    async def answer(request: RegistryCredentialsRequest) -> RegistryCredentialsReply:
        return RegistryCredentialsReply(found=True, username=request.organization_id)

    for bus in buses.values():
        await bus.start()
    publishers = {
        channel.subject: service for service, access in SERVICE_ACCESS.items() for channel in access.publishes
    }
    for access in SERVICE_ACCESS.values():
        for channel in access.consumes:
            raw = Raw()
            publisher = publishers[channel.subject]
            nc = await raw.open(url, user=publisher, password=passwords[publisher])
            try:
                subject = re.sub(r"\{\w+\}", "some-id", channel.subject)
                await nc.jetstream().publish(subject, json.dumps({"token": token}).encode())
            finally:
                await nc.close()
    for key, event in arrived.items():
        await wait_until_async(event.is_set, f"{key} never got its message")
    request = RegistryCredentialsRequest(organization_id=token, image="registry.example.com/a:1")
    reply = await buses["builder"].request(channels.REGISTRY_CREDENTIALS, request, timeout=10)
    assert isinstance(reply, RegistryCredentialsReply) and reply.username == token


@pytest.fixture
def k8s_server(tmp_path: Path) -> Iterator[tuple[int, dict[str, dict[str, str]], Path]]:
    """nats-server with deploy/k8s's nats.conf (k8s_nats.render: ports, paths and routes moved here) and the
    hashes and certificate of the bootstrap Job: (port, Secret name -> data, folder of the certificate)."""
    documents = {doc["metadata"]["name"]: doc["stringData"] for doc in yaml.safe_load_all(k8s_secrets())}
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "hashes.conf").write_text(documents["tidepool-nats-users"]["hashes.conf"])
    for name, text in documents["tidepool-nats-tls"].items():
        (tmp_path / name).write_text(text)
    port, monitor_port = free_port(), free_port()
    text = k8s_nats.render().replace(k8s_nats.TLS_DIR, str(tmp_path))
    text = text.replace(f'"port": {k8s_nats.CLIENT_PORT},', f'"port": {port},', 1)
    text = text.replace(f'"http_port": {k8s_nats.MONITOR_PORT},', f'"http_port": {monitor_port},')
    text = text.replace('"/data/jetstream"', json.dumps(str(tmp_path / "store")))
    text = text.replace('"/var/run/nats/nats.pid"', json.dumps(str(tmp_path / "nats.pid")))
    # One node alone, without its cluster block (the three-node cluster is the runtime's test).
    text, dropped = re.subn(r'\n  "cluster": \{.*?\n  \},', "", text, count=1, flags=re.S)
    assert dropped == 1
    (tmp_path / "nats.conf").write_text(text)
    process = subprocess.Popen(
        [nats_binary(), "-c", str(tmp_path / "nats.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
        env={"POD_NAME": "nats-0"},
    )
    try:
        wait_for_port(port)
        yield port, documents, tmp_path
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_the_kubernetes_secrets_make_a_tls_only_server(
    k8s_server: tuple[int, dict[str, dict[str, str]], Path],
) -> None:
    """deploy/k8s's nats.conf with the bootstrap's Secrets serves TLS only, refuses anonymous clients, and
    each service's login works over it."""
    port, documents, folder = k8s_server
    login = documents["tidepool-nats-runner"]
    user, password = login["TIDEPOOL_NATS_USER"], login["TIDEPOOL_NATS_PASSWORD"]
    with pytest.raises((NoServersError, NatsError, OSError)):  # in clear: refused
        await Raw().open(f"nats://127.0.0.1:{port}", user=user, password=password)
    trust = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    nc = await Raw().open(
        f"tls://127.0.0.1:{port}", user=user, password=password, tls=trust, tls_hostname="nats"
    )
    assert nc.is_connected
    await nc.close()
    with pytest.raises((NoServersError, NatsError, OSError)):  # anonymous, even over TLS: refused
        await Raw().open(f"tls://127.0.0.1:{port}", tls=trust, tls_hostname="nats")
    assert set(documents["tidepool-nats-ca"]) == {"ca.crt"}, "services get the CA, not the server's key"
