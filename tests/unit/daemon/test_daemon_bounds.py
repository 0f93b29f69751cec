"""Issue #7 item 8: no request can wedge the toolbox. User-controlled work (find, search, replace, big
listings) runs in a bounded child process and answers a 4xx naming the bound it reached, while every other
call keeps answering; patterns are never regexes; the supervisor replaces a dead or stopped worker.

No test here measures time: the bounds are tightened through the daemon's environment so they are reached
for certain (a terabyte to read against one second of CPU), and "keeps answering" means "answers while the
bounded child is observably still running".
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.polling import wait_until
from tests.unit.daemon.conftest import daemon_pids

TIB = 1024**4
# The file: forty `a` and a `!` (41 bytes), over which `(a+)+$` backtracks for ever.
CATASTROPHIC_SUBJECT = "a" * 40 + "!"
BIG_FOLDER_ENTRIES = 200_000
# Bounds reached for certain: reading a terabyte takes far more than one second of CPU, on any machine.
TIGHT_BOUNDS = {"TIDEPOOL_DAEMON_JOB_CPU_SECONDS": "1", "TIDEPOOL_DAEMON_JOB_WALL_SECONDS": "60"}
BOUND_MESSAGE = re.compile(r"(CPU-time bound of 1 s|wall-clock bound of 60 s)")

Launcher = Callable[..., contextlib.AbstractContextManager[Path]]


def client_for(socket_path: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://daemon", timeout=60
    )


@contextlib.contextmanager
def tight_daemon(launch_daemon: Launcher, socket_dir: Path, **extra: str) -> Iterator[httpx.Client]:
    with (
        launch_daemon(socket_dir / "toolbox.sock", extra or TIGHT_BOUNDS) as socket_path,
        client_for(socket_path) as client,
    ):
        yield client


def bounded_jobs(socket_path: Path) -> list[int]:
    """The bounded children of the daemon's worker (bounded.py) running right now."""
    _supervisor, worker = daemon_pids(socket_path)
    jobs = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parent = int(re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
        if parent == worker and b"bounded_job" in cmdline:
            jobs.append(int(entry))
    return jobs


def wait_for(condition: Callable[[], Any], what: str, within: float = 30.0) -> Any:
    return wait_until(condition, f"timed out waiting for {what}", timeout=within, interval=0.02)


class Background:
    """One request on its own connection and thread; `result()` waits for its response."""

    def __init__(self, socket_path: Path, method: str, url: str, **kwargs: Any) -> None:
        self._response: httpx.Response | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                with client_for(socket_path) as client:
                    self._response = client.request(method, url, **kwargs)
            except BaseException as error:  # reported by result()
                self._error = error

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> httpx.Response:
        self._thread.join(timeout=120)
        if self._error is not None:
            raise self._error
        assert self._response is not None, "the request never completed"
        return self._response


def assert_others_answer_while_job_runs(client: httpx.Client, socket_path: Path, request: Background) -> None:
    """While `request`'s bounded child is in progress, /version and an exec answer. The child is held
    stopped meanwhile (the worst case: it makes no progress at all), so "while" holds on any machine."""

    def job_or_early_answer() -> list[int]:
        if request.done():
            response = request.result()
            raise AssertionError(
                f"answered before its child was seen: {response.status_code} {response.text}"
            )
        return bounded_jobs(socket_path)

    job = wait_for(job_or_early_answer, "the bounded child")[0]
    os.kill(job, signal.SIGSTOP)
    try:
        version = client.get("/version")
        assert version.status_code == 200, version.text
        executed = client.post("/process/execute", json={"command": "echo ok"})
        assert executed.status_code == 200 and executed.json()["result"] == "ok\n", executed.text
        assert job in bounded_jobs(socket_path)
    finally:
        os.kill(job, signal.SIGCONT)


def assert_bound_error(response: httpx.Response, status: int, code: str, message: re.Pattern[str]) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["source"] == "DAYTONA_DAEMON" and body["code"] == code, body
    assert message.search(body["message"]), body["message"]


@pytest.fixture
def sparse_terabyte(work_dir: Path) -> Path:
    """A 1 TiB file of text (sparse: it takes no disk), with a line to find at its very start."""
    path = work_dir / "huge" / "terabyte.txt"
    path.parent.mkdir()
    with open(path, "wb") as handle:
        handle.write(b"first line\n" + b"x" * 10_000 + b"\n")
        handle.truncate(TIB)
    return path


@pytest.fixture(scope="module")
def big_folder() -> Iterator[Path]:
    """A folder of 200k empty files (shared by the tests of this module; nobody writes to it)."""
    root = Path(tempfile.mkdtemp(prefix="tpd-big-", dir="/tmp"))
    folder = root / "many"
    folder.mkdir()
    for index in range(BIG_FOLDER_ENTRIES):
        os.close(os.open(folder / f"f{index:06d}.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    yield folder
    shutil.rmtree(root, ignore_errors=True)


# ----- patterns are never regexes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["(a+)+$", "(a|aa)+$", "(a|a?)+$", "(.*a){25}", r"^(\w+\s?)*$", "(a*)*b", "([a-zA-Z]+)*!x"],
)
def test_catastrophic_regexes_are_plain_text(
    daemon_client: httpx.Client, work_dir: Path, pattern: str
) -> None:
    """The issue's call and its cousins: each answers at once, as a literal search that finds nothing."""
    (work_dir / "catastrophic.txt").write_text(CATASTROPHIC_SUBJECT)
    response = daemon_client.get("/files/find", params={"path": ".", "pattern": pattern})
    assert response.status_code == 200, response.text
    assert response.json() == []
    assert daemon_client.post("/process/execute", json={"command": "echo ok"}).json()["result"] == "ok\n"


def test_job_processes_cache_their_bytecode_in_the_users_home(
    daemon_client: httpx.Client, work_dir: Path, tmp_path: Path
) -> None:
    """In a sandbox the daemon is mounted read-only without bytecode: each job would compile every module
    again (most of its start-up) without the cache in the user's home (HOME is tmp_path/home here)."""
    (work_dir / "a.txt").write_text("x\n")
    assert daemon_client.get("/files/find", params={"path": ".", "pattern": "x"}).status_code == 200
    cache = tmp_path / "home" / ".cache" / "tidepool-daemon" / "bytecode"
    assert any(cache.rglob("bounded_job.*.pyc")), sorted(cache.rglob("*"))[:20]


def test_a_literal_regex_lookalike_is_found(daemon_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "catastrophic.txt").write_text(CATASTROPHIC_SUBJECT + "\n(a+)+$ in a comment\n")
    matches = daemon_client.get("/files/find", params={"path": ".", "pattern": "(a+)+$"}).json()
    assert matches == [{"file": "catastrophic.txt", "line": 2, "content": "(a+)+$ in a comment"}]


@pytest.mark.parametrize(
    ("pattern", "matches"),
    [
        # Exponential for a backtracking translation (`[^/]*a[^/]*a...b`), linear here.
        ("*a" * 40 + "b", False),
        ("*a" * 40, True),
        ("**a" * 30 + "b", False),
        # Alternatives that would expand to 2**40 patterns.
        ("{a,aa}" * 40 + "b", False),
        ("{a,aa,b}" * 20 + "*", True),
    ],
)
def test_explosive_globs_answer_correctly(
    daemon_client: httpx.Client, work_dir: Path, pattern: str, matches: bool
) -> None:
    folder = work_dir / "explode"
    folder.mkdir()
    (folder / ("a" * 200)).write_text("x")
    (folder / ("a" * 100)).mkdir()
    response = daemon_client.get("/files/search", params={"path": "explode", "pattern": pattern})
    assert response.status_code == 200, response.text
    everything = ["explode/" + "a" * 100, "explode/" + "a" * 200]
    assert response.json() == {"files": everything if matches else []}


def test_overlong_glob_is_refused(daemon_client: httpx.Client, work_dir: Path) -> None:
    response = daemon_client.get("/files/search", params={"path": ".", "pattern": "*" * 4097})
    assert response.status_code == 400
    assert "longer than 4096" in response.json()["message"]


# ----- the bounds ------------------------------------------------------------------------------------------


def test_find_past_the_cpu_bound_answers_408_while_others_answer(
    launch_daemon: Launcher, socket_dir: Path, sparse_terabyte: Path
) -> None:
    with tight_daemon(launch_daemon, socket_dir) as client:
        socket_path = socket_dir / "toolbox.sock"
        find = Background(socket_path, "GET", "/files/find", params={"path": "huge", "pattern": "zzz"})
        assert_others_answer_while_job_runs(client, socket_path, find)
        assert_bound_error(find.result(), 408, "TIME_LIMIT_EXCEEDED", BOUND_MESSAGE)
        assert find.result().json()["message"].startswith("find: ")
        # The daemon is fine afterwards, and a small search still works.
        small = client.get("/files/search", params={"path": "huge", "pattern": "*.txt"})
        assert small.json() == {"files": ["huge/terabyte.txt"]}
        assert wait_for(lambda: not bounded_jobs(socket_path), "the bounded child to be gone")


def test_replace_over_a_huge_tree_stops_at_the_bound_and_leaves_whole_files(
    launch_daemon: Launcher, socket_dir: Path, work_dir: Path, sparse_terabyte: Path
) -> None:
    tree = work_dir / "tree"
    files = []
    for index in range(2_000):
        path = tree / f"d{index % 40}" / f"f{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old value\n" * 10)
        files.append(str(path))
    # Every file of the tree, then the terabyte (scanned for the pattern, which it lacks), a few times.
    listed = files + [str(sparse_terabyte)] * 3
    with tight_daemon(launch_daemon, socket_dir) as client:
        socket_path = socket_dir / "toolbox.sock"
        replace = Background(
            socket_path, "POST", "/files/replace", json={"files": listed, "pattern": "old", "newValue": "new"}
        )
        assert_others_answer_while_job_runs(client, socket_path, replace)
        assert_bound_error(replace.result(), 408, "TIME_LIMIT_EXCEEDED", BOUND_MESSAGE)
    contents = {Path(path).read_text() for path in files}
    assert contents <= {"old value\n" * 10, "new value\n" * 10}, "each file is either untouched or done"
    assert "new value\n" * 10 in contents, "the tree was replaced before the terabyte stopped the job"
    assert list(work_dir.rglob(".tidepool-replace-*")) == [], "the stopped job removed its temporary file"


def test_listing_200k_entries_answers_in_full_while_others_answer(
    daemon_client: httpx.Client, daemon_socket: Path, big_folder: Path
) -> None:
    listing = Background(daemon_socket, "GET", "/files", params={"path": str(big_folder)})
    assert_others_answer_while_job_runs(daemon_client, daemon_socket, listing)
    response = listing.result()
    assert response.status_code == 200, response.text
    entries = response.json()
    assert len(entries) == BIG_FOLDER_ENTRIES
    assert entries[0]["name"] == "f000000.txt" and entries[-1]["name"] == f"f{BIG_FOLDER_ENTRIES - 1:06d}.txt"
    assert set(entries[0]) >= {"name", "isDir", "size", "mode", "modTime", "permissions", "owner", "group"}


def test_listing_past_the_output_bound_answers_422(
    launch_daemon: Launcher, socket_dir: Path, big_folder: Path
) -> None:
    with tight_daemon(launch_daemon, socket_dir, TIDEPOOL_DAEMON_JOB_OUTPUT_MIB="1") as client:
        response = client.get("/files", params={"path": str(big_folder)})
        assert_bound_error(response, 422, "OUTPUT_LIMIT_EXCEEDED", re.compile(r"output bound of 1 MiB"))
        assert client.get("/version").status_code == 200


def test_listing_past_the_memory_bound_answers_422(
    launch_daemon: Launcher, socket_dir: Path, big_folder: Path
) -> None:
    # 24 MiB of address space: the interpreter alone takes about 14, the folder's 200k names another 14+.
    with tight_daemon(launch_daemon, socket_dir, TIDEPOOL_DAEMON_JOB_MEMORY_MIB="24") as client:
        response = client.get("/files", params={"path": str(big_folder)})
        assert_bound_error(response, 422, "MEMORY_LIMIT_EXCEEDED", re.compile(r"memory bound of 24 MiB"))
        small = client.get("/files", params={"path": "."})
        assert small.status_code == 200, "small listings are made in the daemon itself"


def test_search_past_the_output_bound_answers_422(
    launch_daemon: Launcher, socket_dir: Path, big_folder: Path
) -> None:
    with tight_daemon(launch_daemon, socket_dir, TIDEPOOL_DAEMON_JOB_OUTPUT_MIB="1") as client:
        response = client.get("/files/search", params={"path": str(big_folder), "pattern": "*.txt"})
        assert_bound_error(response, 422, "OUTPUT_LIMIT_EXCEEDED", re.compile(r"search: .*output bound"))


# ----- the supervisor --------------------------------------------------------------------------------------


def peer_pid(socket_path: Path) -> int:
    """The pid SO_PEERCRED reports for the toolbox socket: the process that called listen()."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(socket_path))
        pid, _uid, _gid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def new_worker(socket_path: Path, old_worker: int) -> int:
    def replaced() -> int:
        with contextlib.suppress(AssertionError):
            _supervisor, worker = daemon_pids(socket_path)
            if worker != old_worker:
                return worker
        return 0

    return int(wait_for(replaced, "a new worker"))


def test_killed_worker_is_replaced_and_user_processes_survive(
    daemon_client: httpx.Client, daemon_socket: Path
) -> None:
    supervisor, worker = daemon_pids(daemon_socket)
    assert peer_pid(daemon_socket) == supervisor, "the supervisor listens, so the peer check sees it"
    inode = daemon_socket.stat().st_ino
    started = daemon_client.post(
        "/process/execute", json={"command": "nohup sleep 300 >/dev/null 2>&1 & echo $!"}
    )
    background = int(started.json()["result"])
    try:
        os.kill(worker, signal.SIGKILL)
        replacement = new_worker(daemon_socket, worker)
        assert daemon_client.get("/version").status_code == 200
        assert daemon_client.post("/process/execute", json={"command": "echo ok"}).json()["result"] == "ok\n"
        os.kill(background, 0)  # still running: raises ProcessLookupError otherwise
        assert daemon_pids(daemon_socket) == (supervisor, replacement)
        assert daemon_socket.stat().st_ino == inode and peer_pid(daemon_socket) == supervisor
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(background, signal.SIGKILL)


def test_restart_signal_replaces_a_stopped_worker(daemon_client: httpx.Client, daemon_socket: Path) -> None:
    """What the runner does when the toolbox stops answering: SIGUSR1 to the supervisor."""
    supervisor, worker = daemon_pids(daemon_socket)
    os.kill(worker, signal.SIGSTOP)
    try:
        with client_for(daemon_socket) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.get("/version", timeout=0.5)
        os.kill(supervisor, signal.SIGUSR1)
        new_worker(daemon_socket, worker)
        assert daemon_client.get("/version").status_code == 200
        assert not Path(f"/proc/{worker}").exists(), "the stopped worker was killed and reaped"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_sigterm_stops_supervisor_and_worker_and_removes_the_socket(
    launch_daemon: Launcher, socket_dir: Path
) -> None:
    with launch_daemon(socket_dir / "toolbox.sock") as socket_path:
        supervisor, worker = daemon_pids(socket_path)
        os.kill(supervisor, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{worker}").exists(), "the worker to end")
        wait_for(lambda: not socket_path.exists(), "the socket to be removed")


def test_every_worker_gets_the_env_file_next_to_the_socket(
    daemon_client: httpx.Client, daemon_socket: Path
) -> None:
    """A claimed warm-pool sandbox: the runner writes the claimer's env next to the socket; a worker that
    replaces a killed one starts with it too (a `POST /env` alone would be lost with the worker)."""
    (daemon_socket.parent / "env.json").write_text('{"CLAIMED": "yes", "bad=name": "x"}')
    _supervisor, worker = daemon_pids(daemon_socket)
    assert (
        daemon_client.post("/process/execute", json={"command": "echo ${CLAIMED:-no}"}).json()["result"]
        == "no\n"
    )
    os.kill(worker, signal.SIGKILL)
    new_worker(daemon_socket, worker)
    assert (
        daemon_client.post("/process/execute", json={"command": "echo ${CLAIMED:-no}"}).json()["result"]
        == "yes\n"
    )
