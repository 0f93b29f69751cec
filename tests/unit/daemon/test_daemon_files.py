"""File-system endpoints of the real daemon: folders, listing, info, delete, upload and download."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

ONE_MIB = 1024 * 1024
DOWNLOAD_BOUNDARY = "DAYTONA-FILE-BOUNDARY"


def parse_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Independent, strict parser for the daemon's multipart responses (asserts the framing)."""
    delimiter = b"--" + boundary.encode()
    assert body.startswith(delimiter), body[:100]
    assert body.endswith(delimiter + b"--\r\n"), body[-100:]
    sections = body[len(delimiter) :].split(b"\r\n" + delimiter)
    parts: list[tuple[dict[str, str], bytes]] = []
    for section in sections:
        if section.startswith(b"--"):
            break
        assert section.startswith(b"\r\n")
        head, separator, content = section[2:].partition(b"\r\n\r\n")
        assert separator
        headers: dict[str, str] = {}
        for line in head.decode("utf-8").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def upload(
    client: httpx.Client, files: dict[str, bytes], filename_override: str | None = None
) -> httpx.Response:
    """Upload like the sync SDK: all `.path` fields, then all `.file` parts."""
    data = {f"files[{index}].path": path for index, path in enumerate(files)}
    parts = {
        f"files[{index}].file": (filename_override or path, content, "application/octet-stream")
        for index, (path, content) in enumerate(files.items())
    }
    return client.post("/files/bulk-upload", data=data, files=parts)


# ----- folders, listing, info, delete ------------------------------------------------------------------


def test_create_folder_creates_parents(daemon_client: httpx.Client, work_dir: Path) -> None:
    response = daemon_client.post("/files/folder", params={"path": "a/b/c/d", "mode": "750"})
    assert response.status_code == 201
    created = work_dir / "a" / "b" / "c" / "d"
    assert created.is_dir()
    assert stat.S_IMODE(created.stat().st_mode) == 0o750 & ~_umask()
    # Creating it again is not an error, like MkdirAll.
    assert daemon_client.post("/files/folder", params={"path": "a/b/c/d", "mode": "755"}).status_code == 201


def test_create_folder_rejects_bad_mode(daemon_client: httpx.Client) -> None:
    response = daemon_client.post("/files/folder", params={"path": "x", "mode": "rwx"})
    assert response.status_code == 400


def test_list_files_returns_direct_children(daemon_client: httpx.Client, work_dir: Path) -> None:
    folder = work_dir / "listing"
    (folder / "nested").mkdir(parents=True)
    (folder / "nested" / "deep.txt").write_text("deep")
    (folder / "b.txt").write_bytes(b"12345")
    (folder / "a.txt").write_text("")

    response = daemon_client.get("/files", params={"path": "listing"})
    assert response.status_code == 200
    entries = response.json()
    assert [entry["name"] for entry in entries] == ["a.txt", "b.txt", "nested"]
    by_name = {entry["name"]: entry for entry in entries}
    assert by_name["b.txt"]["size"] == 5 and isinstance(by_name["b.txt"]["size"], int)
    assert by_name["nested"]["isDir"] is True
    assert by_name["b.txt"]["isDir"] is False
    assert by_name["b.txt"]["path"] == str(folder / "b.txt")

    deeper = daemon_client.get("/files", params={"path": "listing", "depth": "2"}).json()
    assert str(folder / "nested" / "deep.txt") in [entry["path"] for entry in deeper]


def test_list_missing_directory_is_404(daemon_client: httpx.Client) -> None:
    response = daemon_client.get("/files", params={"path": "nope"})
    assert response.status_code == 404
    assert response.json()["code"] == "FILE_NOT_FOUND"


def test_file_info_fields(daemon_client: httpx.Client, work_dir: Path) -> None:
    target = work_dir / "hello.txt"
    target.write_text("hello sdk")
    target.chmod(0o644)

    info = daemon_client.get("/files/info", params={"path": "hello.txt"}).json()
    assert info["name"] == "hello.txt"
    assert info["isDir"] is False
    assert info["size"] == 9
    assert info["mode"] == "-rw-r--r--"
    assert info["permissions"] == "0644"
    assert info["owner"] == str(os.getuid())
    assert info["group"] == str(os.getgid())
    assert info["path"] == str(target)
    assert isinstance(info["modTime"], str) and info["modTime"].endswith("UTC")
    assert info["modifiedAt"].endswith("Z")

    folder_info = daemon_client.get("/files/info", params={"path": str(work_dir)}).json()
    assert folder_info["isDir"] is True
    assert folder_info["mode"].startswith("d")


def test_file_info_missing_is_404(daemon_client: httpx.Client) -> None:
    response = daemon_client.get("/files/info", params={"path": "missing.txt"})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == "FILE_NOT_FOUND"
    assert body["source"] == "DAYTONA_DAEMON"
    assert body["statusCode"] == 404
    assert "missing.txt" in body["message"]


def test_delete_file(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "gone.txt").write_text("x")
    response = daemon_client.delete("/files", params={"path": "gone.txt", "recursive": "false"})
    assert response.status_code == 204
    assert not (work_dir / "gone.txt").exists()


def test_delete_accepts_a_request_body(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "with-body.txt").write_text("x")
    response = daemon_client.request(
        "DELETE",
        "/files",
        params={"path": "with-body.txt", "recursive": "false"},
        content=b'{"ignored": true}',
    )
    assert response.status_code == 204
    assert not (work_dir / "with-body.txt").exists()
    # The unread body must not corrupt the next request on the pooled connection.
    assert daemon_client.get("/version").status_code == 200


def test_delete_directory_needs_recursive(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "tree" / "inner").mkdir(parents=True)
    (work_dir / "tree" / "inner" / "file").write_text("x")

    refused = daemon_client.delete("/files", params={"path": "tree", "recursive": "false"})
    assert refused.status_code == 400
    assert (work_dir / "tree").exists()

    accepted = daemon_client.delete("/files", params={"path": "tree", "recursive": "true"})
    assert accepted.status_code == 204
    assert not (work_dir / "tree").exists()


def test_delete_missing_is_404(daemon_client: httpx.Client) -> None:
    response = daemon_client.delete("/files", params={"path": "nothing", "recursive": "true"})
    assert response.status_code == 404
    assert response.json()["code"] == "FILE_NOT_FOUND"


def test_permission_denied_is_403(
    socket_dir: Path, launch_daemon: Callable[..., contextlib.AbstractContextManager[Path]], work_dir: Path
) -> None:
    locked = work_dir / "locked"
    locked.mkdir()
    (locked / "f").write_text("x")
    locked.chmod(0o000)
    # Root reads anything through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: run this daemon without them, as
    # a sandbox's user is.
    no_override = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    try:
        with launch_daemon(socket_dir / "toolbox.sock", command_prefix=no_override) as socket_path:
            transport = httpx.HTTPTransport(uds=str(socket_path))
            with httpx.Client(transport=transport, base_url="http://daemon", timeout=30.0) as client:
                response = client.get("/files", params={"path": "locked"})
        assert response.status_code == 403
        assert response.json()["code"] == "FILE_ACCESS_DENIED"
    finally:
        locked.chmod(0o755)


# ----- upload ------------------------------------------------------------------------------------------


def test_bulk_upload_binary_and_nested(daemon_client: httpx.Client, work_dir: Path) -> None:
    big = os.urandom(ONE_MIB)
    every_byte = bytes(range(256))
    response = upload(daemon_client, {"big.bin": big, "deep/er/nested/bytes.bin": every_byte})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "files": [{"path": "big.bin", "bytes": ONE_MIB}, {"path": "deep/er/nested/bytes.bin", "bytes": 256}]
    }
    assert (work_dir / "big.bin").read_bytes() == big
    assert (work_dir / "deep" / "er" / "nested" / "bytes.bin").read_bytes() == every_byte


def test_upload_destination_comes_from_path_field(daemon_client: httpx.Client, work_dir: Path) -> None:
    response = upload(daemon_client, {"dest/real.txt": b"payload"}, filename_override="decoy%2Fname.txt")
    assert response.status_code == 200
    assert (work_dir / "dest" / "real.txt").read_bytes() == b"payload"
    assert not any(path.name.startswith("decoy") for path in work_dir.rglob("*"))


def _chunked_multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> Iterator[bytes]:
    """A multipart body produced piece by piece, so httpx sends it with Transfer-Encoding: chunked."""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        yield f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        for offset in range(0, len(content), 7919):  # odd chunk size to split boundaries awkwardly
            yield content[offset : offset + 7919]
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def test_chunked_upload_with_file_before_path(daemon_client: httpx.Client, work_dir: Path) -> None:
    existing = work_dir / "stream" / "target.bin"
    existing.parent.mkdir()
    existing.write_bytes(b"old content that must be replaced entirely")
    existing.chmod(0o640)
    content = os.urandom(ONE_MIB + 123)
    fresh = os.urandom(5000)
    boundary = "tidepool-test-boundary"
    parts: list[tuple[str, str | None, bytes]] = [
        ("files[0].file", "target.bin", content),  # arrives before its path: must be spooled
        ("files[1].path", None, b"stream/new/fresh.bin"),
        ("files[0].path", None, b"stream/target.bin"),
        ("files[1].file", "fresh.bin", fresh),
    ]
    request = daemon_client.build_request(
        "POST",
        "/files/bulk-upload",
        content=_chunked_multipart(boundary, parts),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in request.headers
    response = daemon_client.send(request)
    assert response.status_code == 200, response.text
    assert response.json()["files"] == [
        {"path": "stream/target.bin", "bytes": len(content)},
        {"path": "stream/new/fresh.bin", "bytes": len(fresh)},
    ]
    assert existing.read_bytes() == content
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640  # overwritten in place, mode kept
    assert (work_dir / "stream" / "new" / "fresh.bin").read_bytes() == fresh
    assert not list(work_dir.glob(".tidepool-upload-*")), "spool files must be cleaned up"


def test_upload_without_path_is_400_with_errors(daemon_client: httpx.Client, work_dir: Path) -> None:
    response = daemon_client.post("/files/bulk-upload", files={"files[0].file": ("orphan.txt", b"data")})
    assert response.status_code == 400
    body = response.json()
    assert body["errors"] and "files[0]" in body["errors"][0]
    assert body["message"]
    assert not list(work_dir.glob(".tidepool-upload-*"))


def test_upload_under_a_regular_file_fails(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "plain").write_text("not a dir")
    response = upload(daemon_client, {"plain/child.txt": b"x", "ok.txt": b"fine"})
    assert response.status_code == 400
    body = response.json()
    assert len(body["errors"]) == 1 and "plain/child.txt" in body["errors"][0]
    assert (work_dir / "ok.txt").read_bytes() == b"fine"


def test_upload_requires_multipart(daemon_client: httpx.Client) -> None:
    response = daemon_client.post("/files/bulk-upload", json={"files": []})
    assert response.status_code == 400


# ----- download ----------------------------------------------------------------------------------------


def test_bulk_download_round_trip_with_missing_file(daemon_client: httpx.Client, work_dir: Path) -> None:
    big = os.urandom(ONE_MIB)
    (work_dir / "data").mkdir()
    (work_dir / "data" / "big.bin").write_bytes(big)
    (work_dir / "hello.txt").write_text("hello sdk")
    requested = ["data/big.bin", "data/missing.txt", "hello.txt"]

    response = daemon_client.post("/files/bulk-download", json={"paths": requested})
    assert response.status_code == 200
    assert response.headers["content-type"] == f"multipart/form-data; boundary={DOWNLOAD_BOUNDARY}"
    parts = parse_multipart(response.content, DOWNLOAD_BOUNDARY)
    assert len(parts) == 3

    big_headers, big_content = parts[0]
    assert big_content == big
    assert big_headers["content-length"] == str(ONE_MIB)
    assert big_headers["content-disposition"] == (
        'form-data; name="file"; filename="data/big.bin"; filename*=utf-8\'\'data%2Fbig.bin'
    )

    error_headers, error_content = parts[1]
    assert error_headers["content-disposition"].startswith(
        'form-data; name="error"; filename="data/missing.txt"'
    )
    assert error_headers["content-type"] == "application/json; charset=utf-8"
    assert error_headers["content-length"] == str(len(error_content))
    error = json.loads(error_content)
    assert error["statusCode"] == 404
    assert error["code"] == "FILE_NOT_FOUND"
    assert error["source"] == "DAYTONA_DAEMON"
    assert "data/missing.txt" in error["message"]

    hello_headers, hello_content = parts[2]
    assert hello_content == b"hello sdk"
    assert hello_headers["content-length"] == "9"


def test_bulk_download_only_missing_is_still_200(daemon_client: httpx.Client) -> None:
    response = daemon_client.post("/files/bulk-download", json={"paths": ["nope.txt"]})
    assert response.status_code == 200
    parts = parse_multipart(response.content, DOWNLOAD_BOUNDARY)
    assert [headers["content-disposition"].split(";")[1].strip() for headers, _ in parts] == ['name="error"']


def test_bulk_download_of_directory_is_error_part(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "folder").mkdir()
    response = daemon_client.post("/files/bulk-download", json={"paths": ["folder"]})
    (headers, content) = parse_multipart(response.content, DOWNLOAD_BOUNDARY)[0]
    assert 'name="error"' in headers["content-disposition"]
    assert json.loads(content)["statusCode"] == 400


def test_bulk_download_rejects_bad_body(daemon_client: httpx.Client) -> None:
    assert daemon_client.post("/files/bulk-download", json={"paths": "x"}).status_code == 400


def test_raw_download(daemon_client: httpx.Client, work_dir: Path) -> None:
    content = os.urandom(300_000)
    (work_dir / "raw.bin").write_bytes(content)
    response = daemon_client.get("/files/download", params={"path": "raw.bin"})
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(content))
    assert response.content == content

    missing = daemon_client.get("/files/download", params={"path": "absent.bin"})
    assert missing.status_code == 404
    assert missing.json()["code"] == "FILE_NOT_FOUND"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
