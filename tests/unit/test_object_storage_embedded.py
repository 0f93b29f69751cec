"""The embedded object storage (a real `rclone serve s3` over TLS, started by the launcher's own code),
the builder's `fetch_context`, and how the SDK's uploader (obstore) can be made to trust its CA."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error

from tidepool_builder.context_store import (
    ContextError,
    ContextNotFoundError,
    UnsafeContextError,
    context_key,
    fetch_context,
    make_client,
)
from tidepool_runtime.object_keys import service_key, user_key
from tidepool_runtime.settings import Settings
from tidepool_stack.supervisor import HOST_CA_BUNDLE, Stack, StackConfig, ensure_object_storage_tls

ORG = "org-7f3a"


@pytest.fixture(scope="module")
async def storage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Stack, Settings]]:
    data_dir = tmp_path_factory.mktemp("object-storage")
    # Never touch the system trust store here: these tests check what trusts the private CA and what not.
    stack = Stack(
        StackConfig(data_dir=data_dir, trust_object_storage_ca=False), sink=lambda service, line: None
    )
    try:
        env = await stack.start_object_storage()
        settings = Settings(
            data_dir=data_dir,
            s3_endpoint=env["TIDEPOOL_S3_ENDPOINT"],
            s3_secret_key=env["TIDEPOOL_S3_SECRET_KEY"],
            s3_bucket=env["TIDEPOOL_S3_BUCKET"],
            s3_region=env["TIDEPOOL_S3_REGION"],
            s3_ca_file=env["TIDEPOOL_S3_CA_FILE"],
        )
        yield stack, settings
    finally:
        await stack.stop()


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def regular(name: str, content: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), content


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, None


def upload(settings: Settings, context_hash: str, data: bytes, organization: str = ORG) -> None:
    client = make_client(settings, organization)
    key = context_key(organization, context_hash)
    client.put_object(settings.s3_bucket, key, io.BytesIO(data), len(data))


# -- the launcher's part ------------------------------------------------------------------------------------


def test_tls_material_keys_and_bundle(storage: tuple[Stack, Settings]) -> None:
    stack, settings = storage
    data_dir = stack.config.data_dir
    tls_dir = data_dir / "tls"
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    for secret in (tls_dir / "ca.key", tls_dir / "server.key", data_dir / "object-storage-keys.json"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert settings.s3_endpoint.startswith("https://localhost:")
    assert (data_dir / "objects").is_dir()
    ca = (tls_dir / "ca.pem").read_bytes()
    bundle = Path(stack.client_ca_bundle).read_bytes()
    assert bundle.endswith(ca)
    if HOST_CA_BUNDLE.is_file():
        assert bundle.startswith(HOST_CA_BUNDLE.read_bytes())
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(tls_dir / "server.pem")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    ca_text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(tls_dir / "ca.pem")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Name Constraints: critical" in ca_text and "CA:TRUE" in ca_text


def test_restart_reuses_ca_and_keys(storage: tuple[Stack, Settings]) -> None:
    stack, settings = storage
    tls_dir = stack.config.data_dir / "tls"
    names = ("ca.pem", "ca.key", "server.pem", "server.key")
    before = {name: (tls_dir / name).read_bytes() for name in names}
    again = ensure_object_storage_tls(tls_dir)
    assert {name: (tls_dir / name).read_bytes() for name in before} == before
    assert again.client_bundle == Path(stack.client_ca_bundle)
    assert stack.object_storage_keys()[1] == settings.s3_secret_key
    # A server certificate not signed by the CA (e.g. a half-finished earlier run) is re-issued.
    (tls_dir / "server.pem").write_bytes((tls_dir / "ca.pem").read_bytes())
    ensure_object_storage_tls(tls_dir)
    assert (tls_dir / "server.pem").read_bytes() != before["ca.pem"]
    assert (tls_dir / "ca.key").read_bytes() == before["ca.key"]
    verify = ["openssl", "verify", "-CAfile", str(tls_dir / "ca.pem"), str(tls_dir / "server.pem")]
    assert subprocess.run(verify, capture_output=True).returncode == 0


def test_storage_requires_the_keys(storage: tuple[Stack, Settings]) -> None:
    _, settings = storage
    wrong = make_client(settings.model_copy(update={"s3_secret_key": "0" * 40}), ORG)
    with pytest.raises((S3Error, InvalidResponseError)) as caught:
        wrong.put_object(settings.s3_bucket, f"{ORG}/x/context.tar", io.BytesIO(b"x"), 1)
    refusal = str(caught.value)
    assert "403" in refusal or "SignatureDoesNotMatch" in refusal or "AccessDenied" in refusal


# -- fetch_context ------------------------------------------------------------------------------------------


async def test_fetch_context_merges_every_archive(storage: tuple[Stack, Settings]) -> None:
    _, settings = storage
    upload(
        settings,
        "h-app",
        tar_of(
            special("work/app", tarfile.DIRTYPE),
            special("work/app/src", tarfile.DIRTYPE),
            regular("work/app/src/main.py", b"print('v1')\n"),
            regular("./work/app/src/pkg/__init__.py", b""),
            regular("work/app/src/pkg/util.py", b"X = 1\n"),
            special("work/app/main-link.py", tarfile.SYMTYPE, "src/main.py"),
            special("work/app/pkg-alias", tarfile.SYMTYPE, "src/pkg"),
            special("work/app/hard.py", tarfile.LNKTYPE, "work/app/src/main.py"),
            special("work/app/dangling", tarfile.SYMTYPE, "nowhere"),
        ),
    )
    upload(
        settings,
        "h-req",
        tar_of(
            regular("work/requirements.txt", b"numpy\n"),
            regular("work/app/src/main.py", b"print('v2')\n"),
        ),
    )
    merged = await fetch_context(settings, ORG, ["h-app", "h-req"])
    assert merged == {
        "work/app/src/main.py": b"print('v2')\n",  # the later context wins, as in one merged tar
        "work/app/src/pkg/__init__.py": b"",
        "work/app/src/pkg/util.py": b"X = 1\n",
        "work/app/main-link.py": b"print('v1')\n",
        "work/app/pkg-alias/__init__.py": b"",
        "work/app/pkg-alias/util.py": b"X = 1\n",
        "work/app/hard.py": b"print('v1')\n",
        "work/requirements.txt": b"numpy\n",
    }
    assert await fetch_context(settings, ORG, []) == {}


async def test_fetch_context_reads_compressed_archives(storage: tuple[Stack, Settings]) -> None:
    _, settings = storage
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("a/b.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    upload(settings, "h-gz", buffer.getvalue())
    assert await fetch_context(settings, ORG, ["h-gz"]) == {"a/b.txt": b"abc"}


UNSAFE = {
    "parent": (regular("../evil", b"x"),),
    "nested-parent": (regular("ok/../../evil", b"x"),),
    "absolute": (regular("/etc/evil", b"x"),),
    "symlink-escape": (special("ok/link", tarfile.SYMTYPE, "../../etc/passwd"),),
    "symlink-absolute": (special("link", tarfile.SYMTYPE, "/etc/passwd"),),
    "hardlink-absolute": (special("hard", tarfile.LNKTYPE, "/etc/passwd"),),
    "hardlink-parent": (special("hard", tarfile.LNKTYPE, "../etc/passwd"),),
    "char-device": (special("dev/null", tarfile.CHRTYPE),),
    "block-device": (special("dev/sda", tarfile.BLKTYPE),),
    "fifo": (special("pipe", tarfile.FIFOTYPE),),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
async def test_fetch_context_rejects_unsafe_archives(storage: tuple[Stack, Settings], case: str) -> None:
    _, settings = storage
    context_hash = f"h-unsafe-{case}"
    upload(settings, context_hash, tar_of(regular("fine.txt", b"ok"), *UNSAFE[case]))
    with pytest.raises(UnsafeContextError) as caught:
        await fetch_context(settings, ORG, [context_hash])
    assert context_hash in str(caught.value)


async def test_missing_context_names_the_hash(storage: tuple[Stack, Settings]) -> None:
    _, settings = storage
    upload(settings, "h-present", tar_of(regular("x.txt", b"x")))
    with pytest.raises(ContextNotFoundError) as caught:
        await fetch_context(settings, ORG, ["h-present", "0123abcd-missing"])
    assert "0123abcd-missing" in str(caught.value)
    # Contexts are per organization: another organization's upload is not found.
    with pytest.raises(ContextNotFoundError):
        await fetch_context(settings, "another-org", ["h-present"])


async def test_garbage_and_bad_input(storage: tuple[Stack, Settings]) -> None:
    _, settings = storage
    upload(settings, "h-garbage", b"this is not a tar archive" * 40)
    with pytest.raises(ContextError, match="h-garbage"):
        await fetch_context(settings, ORG, ["h-garbage"])
    with pytest.raises(ContextError, match="invalid build context hash"):
        await fetch_context(settings, ORG, ["../h-present"])
    with pytest.raises(ContextError, match="not configured"):
        await fetch_context(Settings(s3_endpoint="", s3_secret_key=""), ORG, ["h"])


async def test_tls_is_verified(storage: tuple[Stack, Settings], tmp_path: Path) -> None:
    _, settings = storage
    # Another CA (same generator, different key): the server certificate must not verify against it.
    other = ensure_object_storage_tls(tmp_path / "other-tls")
    with pytest.raises(ContextError, match="h-any") as caught:
        await fetch_context(settings.model_copy(update={"s3_ca_file": str(other.ca_cert)}), ORG, ["h-any"])
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value) or "certificate" in str(caught.value).lower()


# -- how the SDK's uploader trusts the private CA -----------------------------------------------------------
#
# The SDK builds its obstore S3Store inside `isolated_env()`, which empties os.environ; obstore (reqwest +
# rustls) loads its roots right then. So SSL_CERT_FILE works for obstore used directly, but NOT through
# the SDK; AWS_CA_BUNDLE is never read. Through the SDK only the system trust store counts.

SDK_UPLOAD = textwrap.dedent(
    """
    import json, os, sys
    from daytona._sync.object_storage import ObjectStorage
    e = json.loads(sys.argv[1])
    storage = ObjectStorage(
        e["endpoint"], e["access"], e["secret"], "", e["bucket"], region=e["region"]
    )
    print(json.dumps([storage.upload(path, e["org"]) for path in e["paths"]]))
    """
)


def sdk_args(settings: Settings, paths: list[str]) -> str:
    access_key, secret, _ = user_key(settings.s3_secret_key, ORG, 3600)  # what push-access hands out
    return json.dumps(
        {
            "endpoint": settings.s3_endpoint,
            "access": access_key,
            "secret": secret,
            "bucket": settings.s3_bucket,
            "region": settings.s3_region,
            "org": ORG,
            "paths": paths,
        }
    )


def run_sdk_upload(settings: Settings, paths: list[str], env: dict[str, str], system_bundle: str = "") -> str:
    argv = [sys.executable, "-c", SDK_UPLOAD, sdk_args(settings, paths)]
    if system_bundle:
        # A private mount namespace where the system trust store is our bundle: what
        # `update-ca-certificates` with our CA installed gives, without touching the host.
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        argv = ["unshare", "-m", "sh", "-c", script, "sh", system_bundle, str(HOST_CA_BUNDLE), *argv]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    return result.stdout + result.stderr if result.returncode else result.stdout


def can_replace_system_store() -> bool:
    if not (shutil.which("unshare") and HOST_CA_BUNDLE.is_file()):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "sub" / "big.bin").write_bytes(os.urandom(11 * 1024 * 1024))  # three multipart parts
    return root


def test_sdk_ignores_ssl_cert_file_and_aws_ca_bundle(
    storage: tuple[Stack, Settings], context_dir: Path
) -> None:
    stack, settings = storage
    for variable in ("SSL_CERT_FILE", "AWS_CA_BUNDLE"):
        env = {**os.environ, variable: stack.client_ca_bundle}
        output = run_sdk_upload(settings, [str(context_dir / "hello.txt")], env)
        assert "UnknownIssuer" in output, (variable, output[-2000:])


def test_obstore_alone_honours_ssl_cert_file(storage: tuple[Stack, Settings]) -> None:
    stack, settings = storage
    script = textwrap.dedent(
        """
        import json, sys
        from obstore.store import S3Store
        e = json.loads(sys.argv[1])
        store = S3Store(e["bucket"], endpoint=e["endpoint"], region=e["region"], access_key_id=e["access"],
                        secret_access_key=e["secret"], session_token="", retry_config={"max_retries": 0})
        store.put(e["org"] + "/direct/context.tar", b"direct")
        print("uploaded")
        """
    )
    args = sdk_args(settings, [])
    env = {**os.environ, "SSL_CERT_FILE": stack.client_ca_bundle}
    honoured = subprocess.run([sys.executable, "-c", script, args], capture_output=True, text=True, env=env)
    assert honoured.stdout.strip() == "uploaded", honoured.stderr[-2000:]
    env = {**os.environ, "AWS_CA_BUNDLE": stack.client_ca_bundle}
    env.pop("SSL_CERT_FILE", None)
    env.pop("SSL_CERT_DIR", None)
    ignored = subprocess.run([sys.executable, "-c", script, args], capture_output=True, text=True, env=env)
    assert ignored.returncode != 0 and "UnknownIssuer" in ignored.stderr, ignored.stderr[-2000:]


@pytest.mark.skipif(not can_replace_system_store(), reason="needs unshare -m (root) to swap the trust store")
async def test_sdk_upload_with_ca_in_system_store_round_trips(
    storage: tuple[Stack, Settings], context_dir: Path
) -> None:
    stack, settings = storage
    paths = [str(context_dir / "hello.txt"), str(context_dir)]
    output = run_sdk_upload(settings, paths, dict(os.environ), system_bundle=stack.client_ca_bundle)
    hashes = json.loads(output)
    assert len(hashes) == 2 and all(len(value) == 32 for value in hashes)
    merged = await fetch_context(settings, ORG, hashes)
    base = str(context_dir).lstrip("/")
    assert merged == {
        f"{base}/hello.txt": b"hello\n",
        f"{base}/sub/big.bin": (context_dir / "sub" / "big.bin").read_bytes(),
    }
    # Content-addressed: a second upload finds the object (HEAD 200) and returns the same hash.
    again = run_sdk_upload(settings, paths, dict(os.environ), system_bundle=stack.client_ca_bundle)
    assert json.loads(again) == hashes


# -- per-organization scoping ----------------------------------------------------------------------------


def client_with(settings: Settings, access_key: str, secret: str) -> Minio:
    """A client with explicit keys (what an SDK user holds), not the builder's derived service key."""
    return Minio(
        settings.s3_endpoint.removeprefix("https://"),
        access_key=access_key,
        secret_key=secret,
        secure=True,
        region=settings.s3_region,
        http_client=urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=settings.s3_ca_file),
    )


def test_keys_are_scoped_to_their_organization(storage: tuple[Stack, Settings]) -> None:
    _, settings = storage
    other = "org-other"
    upload(settings, "h-private", tar_of(regular("secret.txt", b"theirs")), organization=other)
    mine_key, mine_secret, _ = user_key(settings.s3_secret_key, ORG, 3600)
    mine = client_with(settings, mine_key, mine_secret)
    # The other organization's object does not exist in this key's view, even under its exact key.
    with pytest.raises((S3Error, InvalidResponseError)):
        mine.get_object(settings.s3_bucket, context_key(other, "h-private"))
    mine.put_object(settings.s3_bucket, context_key(ORG, "h-mine"), io.BytesIO(b"ok"), 2)
    theirs_key, theirs_secret = service_key(settings.s3_secret_key, other)
    theirs = client_with(settings, theirs_key, theirs_secret)
    with pytest.raises((S3Error, InvalidResponseError)):
        theirs.get_object(settings.s3_bucket, context_key(ORG, "h-mine"))


def test_expired_or_forged_keys_are_refused(storage: tuple[Stack, Settings]) -> None:
    _, settings = storage
    expired_key, expired_secret, _ = user_key(settings.s3_secret_key, ORG, -10)
    with pytest.raises((S3Error, InvalidResponseError)):
        client_with(settings, expired_key, expired_secret).put_object(
            settings.s3_bucket, context_key(ORG, "h-late"), io.BytesIO(b"x"), 1
        )
    forged_key, _, _ = user_key(settings.s3_secret_key, ORG, 3600)
    with pytest.raises((S3Error, InvalidResponseError)):
        client_with(settings, forged_key, "f" * 40).put_object(
            settings.s3_bucket, context_key(ORG, "h-forged"), io.BytesIO(b"x"), 1
        )
