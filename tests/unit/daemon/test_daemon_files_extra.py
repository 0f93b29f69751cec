"""The rest of the file-system surface on the real daemon: move, permissions, find, search, replace and
the single-file `upload-v2` (multipart or raw, streamed)."""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

MIB = 1024 * 1024


# ----- move ----------------------------------------------------------------------------------------------


def test_move_file_and_directory(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "src.txt").write_text("payload")
    response = daemon_client.post("/files/move", params={"source": "src.txt", "destination": "dst.txt"})
    assert response.status_code == 200, response.text
    assert not (work_dir / "src.txt").exists()
    assert (work_dir / "dst.txt").read_text() == "payload"

    (work_dir / "tree" / "inner").mkdir(parents=True)
    (work_dir / "tree" / "inner" / "f").write_text("x")
    (work_dir / "elsewhere").mkdir()
    response = daemon_client.post(
        "/files/move", params={"source": "tree", "destination": str(work_dir / "elsewhere" / "tree2")}
    )
    assert response.status_code == 200
    assert (work_dir / "elsewhere" / "tree2" / "inner" / "f").read_text() == "x"


def test_move_refuses_to_overwrite(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "a").write_text("a")
    (work_dir / "b").write_text("b")
    response = daemon_client.post("/files/move", params={"source": "a", "destination": "b"})
    assert response.status_code == 409
    body = response.json()
    assert body["source"] == "DAYTONA_DAEMON" and "exists" in body["message"]
    assert (work_dir / "a").read_text() == "a" and (work_dir / "b").read_text() == "b"


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"source": "missing", "destination": "x"}, 404, "FILE_NOT_FOUND"),
        ({"source": "present", "destination": "no/such/dir/x"}, 404, "FILE_NOT_FOUND"),
        ({"source": "present", "destination": ""}, 400, "BAD_REQUEST"),
        ({"source": "present"}, 400, "BAD_REQUEST"),
        ({"source": "dir", "destination": "dir/sub"}, 400, "INVALID_FILE_PATH"),
    ],
)
def test_move_errors(
    daemon_client: httpx.Client, work_dir: Path, params: dict[str, str], status: int, code: str
) -> None:
    (work_dir / "present").write_text("p")
    (work_dir / "dir").mkdir()
    response = daemon_client.post("/files/move", params=params)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code


# ----- permissions ---------------------------------------------------------------------------------------


def test_set_mode(daemon_client: httpx.Client, work_dir: Path) -> None:
    target = work_dir / "script.sh"
    target.write_text("#!/bin/sh\n")
    target.chmod(0o600)
    response = daemon_client.post("/files/permissions", params={"path": "script.sh", "mode": "755"})
    assert response.status_code == 200, response.text
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert daemon_client.post("/files/permissions", params={"path": "script.sh", "mode": "0640"}).is_success
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_set_owner_and_group_by_name_and_id(daemon_client: httpx.Client, work_dir: Path) -> None:
    import grp
    import pwd

    target = work_dir / "owned"
    target.write_text("x")
    me = pwd.getpwuid(os.getuid()).pw_name
    my_group = grp.getgrgid(os.getgid()).gr_name
    response = daemon_client.post(
        "/files/permissions", params={"path": "owned", "owner": me, "group": my_group}
    )
    assert response.status_code == 200, response.text
    response = daemon_client.post(
        "/files/permissions", params={"path": "owned", "owner": str(os.getuid()), "group": str(os.getgid())}
    )
    assert response.status_code == 200
    assert (target.stat().st_uid, target.stat().st_gid) == (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        assert daemon_client.post(
            "/files/permissions", params={"path": "owned", "owner": "nobody"}
        ).is_success
        assert target.stat().st_uid == nobody.pw_uid


@pytest.mark.parametrize(
    ("params", "status", "fragment"),
    [
        ({"path": "f", "mode": "9z"}, 400, "invalid mode"),
        ({"path": "f", "mode": "17777"}, 400, "out of range"),
        ({"path": "f", "owner": "no-such-user-xyz"}, 400, "user not found"),
        ({"path": "f", "group": "no-such-group-xyz"}, 400, "group not found"),
        ({"path": "missing", "mode": "644"}, 404, "not found"),
        ({"mode": "644"}, 400, "path is required"),
    ],
)
def test_permission_errors(
    daemon_client: httpx.Client, work_dir: Path, params: dict[str, str], status: int, fragment: str
) -> None:
    (work_dir / "f").write_text("x")
    response = daemon_client.post("/files/permissions", params=params)
    assert response.status_code == status, response.text
    assert fragment in response.json()["message"]


# ----- find ------------------------------------------------------------------------------------------------


@pytest.fixture
def search_tree(work_dir: Path) -> Path:
    root = work_dir / "proj"
    (root / "src" / "deep").mkdir(parents=True)
    (root / "src" / "main.py").write_text("import os\n\ndef hello():\n    return 'hello world'\n")
    (root / "src" / "deep" / "notes.txt").write_text("TODO(alice): fix\r\nnothing here\nhello again\n")
    (root / "README.md").write_text("# Hello\nfoo(bar) literal\n")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x00hello inside binary\n")
    (root / "src" / "link.py").symlink_to(root / "src" / "main.py")
    return root


def test_find_reports_file_line_and_content(daemon_client: httpx.Client, search_tree: Path) -> None:
    response = daemon_client.get("/files/find", params={"path": "proj", "pattern": "hello"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    matches = response.json()
    assert {(m["file"], m["line"], m["content"]) for m in matches} == {
        ("proj/src/main.py", 3, "def hello():"),
        ("proj/src/main.py", 4, "    return 'hello world'"),
        ("proj/src/deep/notes.txt", 3, "hello again"),
    }, "1-based lines, binary files and symlinks skipped, relative paths joined with the given path"
    assert all(isinstance(m["line"], int) for m in matches)


def test_find_with_absolute_path_and_single_file(daemon_client: httpx.Client, search_tree: Path) -> None:
    matches = daemon_client.get("/files/find", params={"path": str(search_tree), "pattern": "TODO"}).json()
    assert matches == [
        {"file": str(search_tree / "src" / "deep" / "notes.txt"), "line": 1, "content": "TODO(alice): fix"}
    ], "CRLF line endings are stripped"
    single = daemon_client.get("/files/find", params={"path": "proj/README.md", "pattern": "Hello"}).json()
    assert single == [{"file": "proj/README.md", "line": 1, "content": "# Hello"}]


def test_find_is_literal_like_grep_f(daemon_client: httpx.Client, work_dir: Path) -> None:
    """Issue #19 item 4: the pattern is plain text, every regex metacharacter included."""
    folder = work_dir / "prices"
    folder.mkdir()
    (folder / "list.txt").write_text("price: $5.00 (approx)\nprice: 5000\n^def \\w+\\(\\):$ as text\n")
    (folder / "main.py").write_text("def hello():\n")

    def find(pattern: str) -> list[tuple[str, int, str]]:
        response = daemon_client.get("/files/find", params={"path": "prices", "pattern": pattern})
        assert response.status_code == 200, response.text
        return [(m["file"], m["line"], m["content"]) for m in response.json()]

    assert find("$5.00 (") == [("prices/list.txt", 1, "price: $5.00 (approx)")]
    assert find("5.00") == [("prices/list.txt", 1, "price: $5.00 (approx)")], "`.` is not a wildcard"
    assert find("TODO(") == [], "an unbalanced parenthesis is just text"
    # As a regex this would match `def hello():`; as text it matches only the line that spells it out.
    assert find(r"^def \w+\(\):$") == [("prices/list.txt", 3, r"^def \w+\(\):$ as text")]
    assert find("[") == [] and find("*") == []
    assert find("\\") == [("prices/list.txt", 3, r"^def \w+\(\):$ as text")]
    assert find("Price") == [], "case-sensitive"


def test_find_skips_binary_files(daemon_client: httpx.Client, work_dir: Path) -> None:
    folder = work_dir / "mixed"
    folder.mkdir()
    (folder / "text.txt").write_bytes(b"needle in text\n")
    (folder / "blob.bin").write_bytes(b"needle before a NUL\n\x00\x01\x02needle\n")
    # A NUL after the first 8 KiB does not make a file binary (as upstream sniffs only the head).
    (folder / "late.txt").write_bytes(b"x" * 9000 + b"\n\x00needle late\n")
    matches = daemon_client.get("/files/find", params={"path": "mixed", "pattern": "needle"}).json()
    assert sorted((m["file"], m["line"]) for m in matches) == [("mixed/late.txt", 2), ("mixed/text.txt", 1)]
    single = daemon_client.get("/files/find", params={"path": "mixed/blob.bin", "pattern": "needle"})
    assert single.status_code == 200 and single.json() == []


def test_find_errors(daemon_client: httpx.Client, search_tree: Path) -> None:
    assert daemon_client.get("/files/find", params={"path": "nope", "pattern": "x"}).status_code == 404
    assert daemon_client.get("/files/find", params={"path": "proj"}).status_code == 400
    assert daemon_client.get("/files/find", params={"path": "proj", "pattern": "zzz-none"}).json() == []


def test_find_handles_huge_lines_and_many_matches(daemon_client: httpx.Client, work_dir: Path) -> None:
    big = work_dir / "big"
    big.mkdir()
    # 3 MiB without a newline (reported in 1 MiB pieces), then 20k matching lines.
    with open(big / "one-line.txt", "wb") as handle:
        handle.write(b"a" * (3 * MIB) + b"needle\n")
        handle.write(b"needle line\n" * 20_000)
    matches = daemon_client.get("/files/find", params={"path": "big", "pattern": "needle"}).json()
    assert len(matches) == 20_001
    assert matches[0]["line"] == 1 and matches[0]["content"].endswith("needle")
    assert matches[-1]["line"] == 20_001


# ----- search ----------------------------------------------------------------------------------------------


def test_search_globs_basenames_recursively(daemon_client: httpx.Client, search_tree: Path) -> None:
    response = daemon_client.get("/files/search", params={"path": "proj", "pattern": "*.py"})
    assert response.status_code == 200
    assert response.json() == {"files": ["proj/src/link.py", "proj/src/main.py"]}

    txt = daemon_client.get("/files/search", params={"path": str(search_tree), "pattern": "*.txt"}).json()
    assert txt == {"files": [str(search_tree / "src" / "deep" / "notes.txt")]}

    dirs = daemon_client.get("/files/search", params={"path": "proj", "pattern": "de?p"}).json()
    assert dirs == {"files": ["proj/src/deep"]}, "directories match by name too"

    braces = daemon_client.get("/files/search", params={"path": "proj", "pattern": "*.{md,bin}"}).json()
    assert braces == {"files": ["proj/README.md", "proj/image.bin"]}

    nothing = daemon_client.get("/files/search", params={"path": "proj", "pattern": "*.rs"}).json()
    assert nothing == {"files": []}


def test_search_with_slash_matches_relative_paths(daemon_client: httpx.Client, search_tree: Path) -> None:
    deep = daemon_client.get("/files/search", params={"path": "proj", "pattern": "src/**/*.txt"}).json()
    assert deep == {"files": ["proj/src/deep/notes.txt"]}
    top = daemon_client.get("/files/search", params={"path": "proj", "pattern": "src/*.py"}).json()
    assert top == {"files": ["proj/src/link.py", "proj/src/main.py"]}


def test_search_errors(daemon_client: httpx.Client, search_tree: Path) -> None:
    assert daemon_client.get("/files/search", params={"path": "missing", "pattern": "*"}).status_code == 404
    assert daemon_client.get("/files/search", params={"path": "proj"}).status_code == 400
    not_dir = daemon_client.get("/files/search", params={"path": "proj/README.md", "pattern": "*"})
    assert not_dir.status_code == 400


# ----- replace ---------------------------------------------------------------------------------------------


def test_replace_in_files(daemon_client: httpx.Client, work_dir: Path) -> None:
    first = work_dir / "one.txt"
    second = work_dir / "two.txt"
    first.write_text("old_function(); old_function()\n")
    second.write_text("nothing to see\n")
    first.chmod(0o640)
    response = daemon_client.post(
        "/files/replace",
        json={
            "files": ["one.txt", str(second), "missing.txt"],
            "pattern": "old_function",
            "newValue": "new_fn",
        },
    )
    assert response.status_code == 200
    results = response.json()
    assert [(r["file"], r["success"]) for r in results] == [
        ("one.txt", True),
        (str(second), True),
        ("missing.txt", False),
    ]
    assert "not found" in results[2]["error"]
    assert first.read_text() == "new_fn(); new_fn()\n"
    assert stat.S_IMODE(first.stat().st_mode) == 0o640, "the file keeps its mode"
    assert second.read_text() == "nothing to see\n"


def test_replace_is_literal_and_streams_across_chunks(daemon_client: httpx.Client, work_dir: Path) -> None:
    target = work_dir / "large.txt"
    # Occurrences straddle the daemon's 1 MiB read chunks; `a.c` must not be treated as a regex.
    unit = b"x" * 1021 + b"a.c"
    content = unit * 3000 + b"abc"
    target.write_bytes(content)
    response = daemon_client.post(
        "/files/replace", json={"files": ["large.txt"], "pattern": "a.c", "newValue": "<é>"}
    )
    assert response.json()[0]["success"] is True
    assert target.read_bytes() == content.replace(b"a.c", "<é>".encode())


def test_replace_through_symlink_keeps_the_link(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "real.txt").write_text("v1")
    (work_dir / "alias.txt").symlink_to(work_dir / "real.txt")
    daemon_client.post("/files/replace", json={"files": ["alias.txt"], "pattern": "v1", "newValue": "v2"})
    assert (work_dir / "alias.txt").is_symlink()
    assert (work_dir / "real.txt").read_text() == "v2"


def test_replace_rejects_bad_bodies(daemon_client: httpx.Client, work_dir: Path) -> None:
    assert daemon_client.post("/files/replace", json={"files": "x", "pattern": "a"}).status_code == 400
    assert daemon_client.post("/files/replace", json={"files": ["x"], "pattern": ""}).status_code == 400
    directory = daemon_client.post("/files/replace", json={"files": ["."], "pattern": "a", "newValue": "b"})
    assert directory.json()[0]["success"] is False


# ----- upload-v2 -------------------------------------------------------------------------------------------


def test_upload_v2_multipart(daemon_client: httpx.Client, work_dir: Path) -> None:
    payload = bytes(range(256)) * 64
    response = daemon_client.post(
        "/files/upload-v2",
        params={"path": "up/nested/data.bin"},
        files={"file": ("ignored-name.bin", payload, "application/x-custom")},
        data={"note": "an extra field is ignored"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    target = work_dir / "up" / "nested" / "data.bin"
    assert body == {
        "name": "data.bin",
        "path": str(target),
        "type": "application/x-custom",
        "size": len(payload),
    }
    assert target.read_bytes() == payload


def test_upload_v2_raw_body_overwrites_and_keeps_mode(daemon_client: httpx.Client, work_dir: Path) -> None:
    target = work_dir / "raw.txt"
    target.write_text("old content that is longer")
    target.chmod(0o600)
    response = daemon_client.post("/files/upload-v2", params={"path": "raw.txt"}, content=b"new")
    assert response.status_code == 200
    assert response.json()["type"] == "text/plain"
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    leftovers = [name for name in os.listdir(work_dir) if name.startswith(".tidepool-upload-")]
    assert leftovers == []


def test_upload_v2_writes_through_a_symlink(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "real.bin").write_bytes(b"old")
    (work_dir / "link.bin").symlink_to(work_dir / "real.bin")
    response = daemon_client.post("/files/upload-v2", params={"path": "link.bin"}, content=b"new")
    assert response.status_code == 200
    assert (work_dir / "link.bin").is_symlink()
    assert (work_dir / "real.bin").read_bytes() == b"new"


def test_upload_v2_errors(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "adir").mkdir()
    (work_dir / "afile").write_text("x")
    assert daemon_client.post("/files/upload-v2", content=b"x").status_code == 400
    directory = daemon_client.post("/files/upload-v2", params={"path": "adir"}, content=b"x")
    assert directory.status_code == 400 and directory.json()["code"] == "INVALID_FILE_PATH"
    under_file = daemon_client.post("/files/upload-v2", params={"path": "afile/x"}, content=b"x")
    assert under_file.status_code in (400, 404)
    no_file_field = daemon_client.post(
        "/files/upload-v2", params={"path": "n"}, files={"notfile": ("a", b"1")}
    )
    assert no_file_field.status_code == 400 and "'file'" in no_file_field.json()["message"]


def test_upload_v2_and_download_stream_a_large_file(
    daemon_client: httpx.Client, work_dir: Path
) -> None:
    # Whether the daemon streams in constant memory (its peak RSS growth) is measured by `make bench`
    # (tests/bench/bench_transfer.py, 1 GiB through the SDK); here: a large transfer arrives intact.
    size = 256 * MIB
    block = os.urandom(MIB)

    def chunks() -> Iterator[bytes]:
        for _ in range(size // MIB):
            yield block

    response = daemon_client.post("/files/upload-v2", params={"path": "big.bin"}, content=chunks())
    assert response.status_code == 200, response.text
    assert (work_dir / "big.bin").stat().st_size == size
    received = 0
    crc = 0
    with daemon_client.stream("GET", "/files/download", params={"path": "big.bin"}) as download:
        assert download.headers["content-length"] == str(size)
        for piece in download.iter_bytes():
            received += len(piece)
            crc = zlib.crc32(piece, crc)
    assert received == size
    expected = 0
    for _ in range(size // MIB):
        expected = zlib.crc32(block, expected)
    assert crc == expected
