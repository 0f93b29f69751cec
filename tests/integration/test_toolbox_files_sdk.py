"""The toolbox file system, signed file URLs, `update_env` and live metrics through the official SDK
(daytona==0.226.1) against a real stack: proxy -> runner -> daemon in a Podman container."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from daytona import (
    Daytona,
    DaytonaBadRequestError,
    DaytonaConfig,
    DaytonaConflictError,
    DaytonaError,
    DaytonaFileAccessDeniedError,
    DaytonaFileNotFoundError,
    DaytonaForbiddenError,
    DaytonaNotFoundError,
    FileDownloadRequest,
    FileUpload,
    Sandbox,
)

from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

GIB = 1024**3
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def sandbox(stack: StackThread, sdk_env: None) -> Iterator[Sandbox]:
    daytona = Daytona()
    created = daytona.create()
    try:
        yield created
    finally:
        daytona.delete(created)


@pytest.fixture
def folder(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh relative folder (relative paths resolve against the work dir, /home/daytona)."""
    name = f"t-{request.node.name[:40]}-{os.urandom(3).hex()}".replace("[", "-").replace("]", "")
    sandbox.fs.create_folder(name, "755")
    yield name
    sandbox.fs.delete_file(name, recursive=True)


# ----- folders, listing, info, delete --------------------------------------------------------------------


def test_folders_listing_info_and_delete(sandbox: Sandbox, folder: str) -> None:
    sandbox.fs.create_folder(f"{folder}/a/b/c/d", "750")  # parents are created, like MkdirAll
    sandbox.fs.upload_file(b"hello sdk", f"{folder}/a/hello.txt")
    names = sorted(entry.name for entry in sandbox.fs.list_files(f"{folder}/a"))
    assert names == ["b", "hello.txt"]
    deep = [entry.path for entry in sandbox.fs.list_files(folder, depth=4)]
    assert f"/home/daytona/{folder}/a/b/c/d" in deep

    info = sandbox.fs.get_file_info(f"{folder}/a/hello.txt")
    assert (info.name, info.size, info.is_dir) == ("hello.txt", 9, False)
    assert sandbox.fs.get_file_info(f"{folder}/a/b/c/d").is_dir is True

    with pytest.raises(DaytonaBadRequestError):
        sandbox.fs.delete_file(f"{folder}/a/b")  # a directory needs recursive=True
    sandbox.fs.delete_file(f"{folder}/a/b", recursive=True)
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.get_file_info(f"{folder}/a/b")
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.delete_file(f"{folder}/never-existed.txt")


# ----- find, search, replace -------------------------------------------------------------------------------


def test_find_search_and_replace(sandbox: Sandbox, folder: str) -> None:
    sandbox.fs.upload_files(
        [
            FileUpload(b"import os\ndef hello():\n    return 'hello world'\n", f"{folder}/src/main.py"),
            FileUpload(b"TODO(alice): hello\r\n", f"{folder}/src/deep/notes.txt"),
            FileUpload(b"\x00\x01binary hello\n", f"{folder}/blob.bin"),
        ]
    )
    matches = sandbox.fs.find_files(folder, "hello")
    assert {(m.file, m.line, m.content) for m in matches} == {
        (f"{folder}/src/main.py", 2, "def hello():"),
        (f"{folder}/src/main.py", 3, "    return 'hello world'"),
        (f"{folder}/src/deep/notes.txt", 1, "TODO(alice): hello"),
    }
    # Plain text, like Daytona's daemon (grep -F): no character is special (issue #19 item 4).
    assert sandbox.fs.find_files(folder, r"^def \w+\(\):") == []
    literal = sandbox.fs.find_files(folder, "TODO(")
    assert [(m.file, m.line) for m in literal] == [(f"{folder}/src/deep/notes.txt", 1)]
    assert [m.line for m in sandbox.fs.find_files(folder, "hello(")] == [2]
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.find_files(f"{folder}/missing", "x")

    found = sandbox.fs.search_files(folder, "*.txt")
    assert found.files == [f"{folder}/src/deep/notes.txt"]
    assert sandbox.fs.search_files(folder, "*.py").files == [f"{folder}/src/main.py"]
    assert sandbox.fs.search_files(folder, "*.rs").files == []

    results = sandbox.fs.replace_in_files(
        [f"{folder}/src/main.py", f"{folder}/src/missing.py"], "hello", "goodbye"
    )
    assert [(r.file, r.success) for r in results] == [
        (f"{folder}/src/main.py", True),
        (f"{folder}/src/missing.py", False),
    ]
    assert results[1].error
    assert sandbox.fs.download_file(f"{folder}/src/main.py") == (
        b"import os\ndef goodbye():\n    return 'goodbye world'\n"
    )


# ----- permissions and move --------------------------------------------------------------------------------


def test_permissions_and_move(sandbox: Sandbox, folder: str) -> None:
    sandbox.fs.upload_file(b"#!/bin/sh\necho ran\n", f"{folder}/run.sh")
    sandbox.fs.set_file_permissions(f"{folder}/run.sh", mode="755")
    info = sandbox.fs.get_file_info(f"{folder}/run.sh")
    assert info.permissions == "0755" and info.mode == "-rwxr-xr-x"
    assert sandbox.process.exec(f"./{folder}/run.sh").result == "ran\n"
    sandbox.fs.set_file_permissions(f"{folder}/run.sh", mode="0600", owner="daytona", group="daytona")
    assert sandbox.fs.get_file_info(f"{folder}/run.sh").permissions == "0600"
    with pytest.raises(DaytonaBadRequestError):
        sandbox.fs.set_file_permissions(f"{folder}/run.sh", owner="no-such-user")
    with pytest.raises(DaytonaFileAccessDeniedError):
        sandbox.fs.set_file_permissions(f"{folder}/run.sh", owner="root")  # not permitted as daytona

    sandbox.fs.move_files(f"{folder}/run.sh", f"{folder}/renamed.sh")
    assert sandbox.fs.download_file(f"{folder}/renamed.sh") == b"#!/bin/sh\necho ran\n"
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.get_file_info(f"{folder}/run.sh")
    sandbox.fs.upload_file(b"other", f"{folder}/other.txt")
    with pytest.raises(DaytonaConflictError):
        sandbox.fs.move_files(f"{folder}/renamed.sh", f"{folder}/other.txt")
    sandbox.fs.create_folder(f"{folder}/dir/sub", "755")
    sandbox.fs.move_files(f"{folder}/dir", f"{folder}/moved-dir")
    assert sandbox.fs.get_file_info(f"{folder}/moved-dir/sub").is_dir
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.move_files(f"{folder}/nope", f"{folder}/x")


def test_access_denied_as_the_sandbox_user(sandbox: Sandbox, folder: str) -> None:
    # The daemon runs as `daytona`; /root is root's, mode 0700.
    with pytest.raises(DaytonaFileAccessDeniedError) as listing:
        sandbox.fs.list_files("/root")
    assert isinstance(listing.value, DaytonaForbiddenError)
    with pytest.raises(DaytonaForbiddenError):
        sandbox.fs.get_file_info("/root/.bashrc")
    with pytest.raises(DaytonaForbiddenError):
        sandbox.fs.find_files("/root", "x")
    with pytest.raises(DaytonaForbiddenError):
        sandbox.fs.search_files("/root", "*")
    with pytest.raises(DaytonaForbiddenError):
        sandbox.fs.set_file_permissions("/root", mode="777")
    sandbox.fs.upload_file(b"mine", f"{folder}/mine.txt")
    with pytest.raises(DaytonaForbiddenError):
        sandbox.fs.move_files(f"{folder}/mine.txt", "/root/mine.txt")
    with pytest.raises(DaytonaForbiddenError):
        b"".join(sandbox.fs.download_file_stream("/etc/shadow"))
    # Bulk upload reports per-file failures in `errors` (the SDK raises a plain DaytonaError for them).
    with pytest.raises(DaytonaError, match="access denied"):
        sandbox.fs.upload_file(b"x", "/root/x.txt")


# ----- transfers -------------------------------------------------------------------------------------------


def test_upload_and_download_variants(sandbox: Sandbox, folder: str, tmp_path: Path) -> None:
    payload = os.urandom(3 * MIB)
    sandbox.fs.upload_file(payload, f"{folder}/one.bin")
    assert sandbox.fs.download_file(f"{folder}/one.bin") == payload

    local = tmp_path / "local.bin"
    local.write_bytes(payload[: MIB + 7])
    sandbox.fs.upload_file(str(local), f"{folder}/from-disk.bin")
    target = tmp_path / "downloaded.bin"
    sandbox.fs.download_file(f"{folder}/from-disk.bin", str(target))
    assert target.read_bytes() == payload[: MIB + 7]

    sandbox.fs.upload_files(
        [
            FileUpload(bytes(range(256)), f"{folder}/multi/a.bin"),
            FileUpload(b"b" * 10, f"{folder}/multi/b.txt"),
        ]
    )
    responses = sandbox.fs.download_files(
        [
            FileDownloadRequest(source=f"{folder}/multi/a.bin"),
            FileDownloadRequest(source=f"{folder}/multi/b.txt"),
            FileDownloadRequest(source=f"{folder}/multi/missing.txt"),
        ]
    )
    assert [r.result for r in responses[:2]] == [bytes(range(256)), b"b" * 10]
    assert responses[2].error and responses[2].result is None

    streamed = b"".join(sandbox.fs.download_file_stream(f"{folder}/one.bin"))
    assert streamed == payload
    with pytest.raises(DaytonaError):
        b"".join(sandbox.fs.download_file_stream(f"{folder}/missing.bin"))

    sent: list[int] = []
    sandbox.fs.upload_file_stream(
        io.BytesIO(payload), f"{folder}/streamed.bin", on_progress=lambda p: sent.append(p.bytes_sent)
    )
    assert sent and sent[-1] == len(payload)
    assert sandbox.fs.download_file(f"{folder}/streamed.bin") == payload


# ----- signed URLs -----------------------------------------------------------------------------------------


def test_signed_download_and_upload_urls(sandbox: Sandbox, folder: str) -> None:
    payload = os.urandom(256 * 1024)
    sandbox.fs.upload_file(payload, f"{folder}/signed.bin")
    url = sandbox.download_url(f"{folder}/signed.bin")
    assert "signature=" in url and "expires=" in url
    with httpx.Client(timeout=60) as plain:  # no credentials at all
        response = plain.get(url)
        assert response.status_code == 200, response.text
        assert response.content == payload

        upload = sandbox.upload_url(f"{folder}/via-url/new.bin")
        posted = plain.post(upload, files={"file": ("whatever.bin", b"uploaded bytes", "application/x-test")})
        assert posted.status_code == 200, posted.text
        body = posted.json()
        assert body["name"] == "new.bin" and body["path"].endswith(f"{folder}/via-url/new.bin")
        assert body["type"] == "application/x-test"
        assert sandbox.fs.download_file(f"{folder}/via-url/new.bin") == b"uploaded bytes"

        raw = plain.post(sandbox.upload_url(f"{folder}/raw.txt", ttl_seconds=0), content=b"raw body")
        assert raw.status_code == 200 and "expires=0" in raw.request.url.query.decode()
        assert sandbox.fs.download_file(f"{folder}/raw.txt") == b"raw body"

        # A path with spaces and non-ASCII characters: the signature covers the decoded value.
        odd = f"{folder}/dir with space/ünïcode +plus.txt"
        sandbox.fs.upload_file(b"odd", odd)
        assert plain.get(sandbox.download_url(odd)).content == b"odd"


def _tampered(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


def test_signed_url_rejections(sandbox: Sandbox, folder: str) -> None:
    sandbox.fs.upload_file(b"secret", f"{folder}/secret.txt")
    sandbox.fs.upload_file(b"other", f"{folder}/other.txt")
    url = sandbox.download_url(f"{folder}/secret.txt")
    signature = parse_qs(urlsplit(url).query)["signature"][0]
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    with httpx.Client(timeout=30) as plain:
        assert plain.get(url).status_code == 200
        for bad in (
            _tampered(url, signature=flipped),
            _tampered(url, path=f"{folder}/other.txt"),
            _tampered(url, expires=str(int(time.time()) + 7200)),
            url.replace("/files/download", "/files/info"),
        ):
            rejected = plain.get(bad)
            assert rejected.status_code == 401, bad
            assert rejected.json()["statusCode"] == 401
        assert plain.post(url.replace("/files/download", "/files/upload-v2"), content=b"x").status_code == 401

        short_lived = sandbox.download_url(f"{folder}/secret.txt", ttl_seconds=1)
        answers: list[httpx.Response] = []

        def refused() -> bool:
            answers.append(plain.get(short_lived))
            return answers[-1].status_code != 200

        wait_until(refused, "the 1 s URL was still accepted", interval=0.2)
        assert answers[-1].status_code == 401 and "expired" in answers[-1].json()["message"]


def test_rotating_the_key_invalidates_old_urls(sandbox: Sandbox, folder: str) -> None:
    sandbox.fs.upload_file(b"rotate me", f"{folder}/r.txt")
    old_url = sandbox.download_url(f"{folder}/r.txt", ttl_seconds=0)
    with httpx.Client(timeout=30) as plain:
        assert plain.get(old_url).status_code == 200
        sandbox.rotate_signing_key()
        new_url = sandbox.download_url(f"{folder}/r.txt")
        assert plain.get(new_url).content == b"rotate me", "a URL made right after rotation works"
        assert plain.get(old_url).status_code == 401
        # Another client object (fresh key fetch) agrees with the rotated key.
        again = Daytona().get(sandbox.id)
        assert plain.get(again.download_url(f"{folder}/r.txt")).status_code == 200


def test_signing_key_is_not_available_to_other_organizations(stack: StackThread, sandbox: Sandbox) -> None:
    tenant = httpx.post(
        f"{stack.api_url}/organizations",
        json={"name": "signing-outsider"},
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    other_key = tenant.json()["apiKey"]["value"]
    headers = {"Authorization": f"Bearer {other_key}"}
    assert httpx.get(f"{stack.api_url}/sandbox/{sandbox.id}/signing-key", headers=headers).status_code == 404
    rotate = httpx.post(f"{stack.api_url}/sandbox/{sandbox.id}/signing-key/rotate", headers=headers)
    assert rotate.status_code == 404
    with pytest.raises(DaytonaNotFoundError):
        Daytona(DaytonaConfig(api_key=other_key, api_url=stack.api_url)).get(sandbox.id)


# ----- environment and metrics -----------------------------------------------------------------------------


def test_update_env_reaches_later_execs(sandbox: Sandbox) -> None:
    sandbox.update_env({"TP_FEATURE": "on", "TP_SPACES": "a b  c"})
    assert sandbox.process.exec('printf "%s|%s" "$TP_FEATURE" "$TP_SPACES"').result == "on|a b  c"
    sandbox.update_env({"TP_FEATURE": "off"}, unset=["TP_SPACES"])
    assert sandbox.process.exec('printf "%s|%s" "$TP_FEATURE" "${TP_SPACES-unset}"').result == "off|unset"


def test_metrics_latest(sandbox: Sandbox) -> None:
    metrics = sandbox.get_metrics_latest()
    assert metrics.mem_total == sandbox.memory * GIB, "the container's memory limit, not the host's"
    assert metrics.cpu_count == sandbox.cpu
    for value in (metrics.cpu_used_pct, metrics.mem_used, metrics.mem_cache, metrics.disk_used):
        assert value >= 0
    assert 0 < metrics.mem_used < metrics.mem_total
    assert 0 <= metrics.cpu_used_pct <= 100
    assert metrics.disk_total > 0 and metrics.disk_used <= metrics.disk_total
    assert abs((datetime.now(UTC) - metrics.timestamp).total_seconds()) < 60
