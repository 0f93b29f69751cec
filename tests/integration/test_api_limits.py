"""Issue #9 item 3: a running API process refuses oversized bodies (413) and heads (431) without reading them.

The API runs as its own process (`python -m tidepool_api`, as `make up` starts it) against a real nats-server
and SQLite. Requests are written on raw sockets so that the client can stop sending as soon as the server
answers, as a real client's kernel would when the server closes. Memory is checked behaviourally: the API's
resident set grows by far less than the 100 MB offered.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_for_port
from tests.polling import wait_until

MIB = 1024 * 1024
OFFERED = 100 * MIB
CHUNK = 64 * 1024


@pytest.fixture
def api_process(nats_url: str, tmp_path: Path) -> Iterator[tuple[int, str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "TIDEPOOL_NATS_URL": nats_url,
        "TIDEPOOL_DATA_DIR": str(tmp_path),
        "TIDEPOOL_DATABASE_URL": "",
        "TIDEPOOL_API_PORT": str(port),
        "TIDEPOOL_CREATE_WAIT_SECONDS": "0.5",
    }
    log = (tmp_path / "api.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tidepool_api"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, timeout=60)
        key_file = tmp_path / "admin-api-key"
        wait_until(key_file.exists, f"the API wrote no admin key: {tmp_path / 'api.log'}", timeout=60)
        yield port, key_file.read_text().strip(), process.pid
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def exchange(port: int, head: bytes, chunks: Iterable[bytes]) -> tuple[bytes, int]:
    """Send `head` then `chunks` until the server answers or stops reading; return (answer, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(30)
        try:
            sock.sendall(head)
            sent += len(head)
            for chunk in chunks:
                if select.select([sock], [], [], 0)[0]:
                    break  # answered: a client stops sending here
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                head_end = answer.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = next(
                        (
                            int(line.split(b":", 1)[1])
                            for line in answer[:head_end].split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        None,
                    )
                    if length is not None and len(answer) >= head_end + 4 + length:
                        break
        except ConnectionResetError:
            pass
    return answer, sent


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head, "no answer"
    return int(head.split(b" ", 2)[1]), json.loads(body)


def repeat(chunk: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(chunk)):
        yield chunk


def create_head(port: int, key: str, extra: str) -> bytes:
    return (
        f"POST /api/sandbox HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def test_oversized_bodies_get_413_unread_and_nothing_is_created(api_process) -> None:  # type: ignore[no-untyped-def]
    port, key, pid = api_process
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
    baseline = rss_bytes(pid)
    padding = b"x" * CHUNK

    # Declared size over the limit: refused before one byte of the body is read.
    head = create_head(port, key, f"Content-Length: {OFFERED}\r\n")
    answer, sent = exchange(port, head, repeat(padding, OFFERED))
    status, body = status_and_body(answer)
    assert status == 413, answer[:300]
    assert "TIDEPOOL_API_MAX_BODY_BYTES" in str(body["message"]) and body["statusCode"] == 413
    assert sent < OFFERED

    # Chunked (no declared size): counted while streaming, refused once past the limit.
    head = create_head(port, key, "Transfer-Encoding: chunked\r\n")

    def framed(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    answer, sent = exchange(
        port, head + framed(b'{"name": "big", "pad": "'), repeat(framed(padding), OFFERED)
    )
    status, body = status_and_body(answer)
    assert status == 413, answer[:300]
    assert sent < OFFERED

    # A 10 MB body through an ordinary client: a 413, never a 503 (which clients would retry).
    response = client.post("/api/sandbox", content=b'{"name": "ten", "pad": "' + b"x" * (10 * MIB) + b'"}')
    assert response.status_code == 413, response.text

    assert rss_bytes(pid) - baseline < 20 * MIB  # far below the 100 MB offered
    assert client.get("/api/sandbox").json()["items"] == []
    # Under the limit, a body is read as usual (an API key: no runner is needed).
    under = client.post("/api/api-keys", json={"name": "under-limit", "pad": "x" * (900 * 1024)})
    assert under.status_code == 201, under.text
    assert client.get("/api/health").status_code == 200
    client.close()


def test_oversized_heads_get_431_and_memory_stays_flat(api_process) -> None:  # type: ignore[no-untyped-def]
    port, key, pid = api_process
    baseline = rss_bytes(pid)
    head = f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Big: ".encode()
    answer, sent = exchange(port, head, repeat(b"a" * CHUNK, 32 * MIB))
    status, body = status_and_body(answer)
    assert status == 431, answer[:300]
    assert "headers" in str(body["message"])
    assert sent < 32 * MIB
    # A huge request line is a head too.
    answer, _ = exchange(port, b"GET /api/health?q=", repeat(b"a" * CHUNK, 32 * MIB))
    assert status_and_body(answer)[0] == 431
    assert rss_bytes(pid) - baseline < 20 * MIB
    # Ordinary heads, including a large-but-allowed one, still work on the same process.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/api/health", headers={"X-Fine": "b" * (32 * 1024)}).status_code == 200
        listed = client.get("/api/sandbox", headers={"Authorization": f"Bearer {key}"})
        assert listed.status_code == 200
