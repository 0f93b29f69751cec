"""`POST /process/execute` against the real daemon."""

from __future__ import annotations

import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.polling import process_alive, wait_until, wait_until_dead


def execute(client: httpx.Client, command: str, **fields: Any) -> httpx.Response:
    return client.post("/process/execute", json={"command": command, **fields})


def test_echo(daemon_client: httpx.Client) -> None:
    response = execute(daemon_client, "echo hello")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["result"] == "hello\n"
    assert body["exitCode"] == 0
    assert body["termination"] == {"reason": "exited", "signal": None}


def test_exit_code_is_reported(daemon_client: httpx.Client) -> None:
    body = execute(daemon_client, "exit 42").json()
    assert body["exitCode"] == 42
    assert isinstance(body["exitCode"], int)


def test_runs_in_work_dir_by_default(daemon_client: httpx.Client, work_dir: Path) -> None:
    assert execute(daemon_client, "pwd").json()["result"].strip() == str(work_dir)


def test_cwd_absolute_and_relative(daemon_client: httpx.Client, work_dir: Path, tmp_path: Path) -> None:
    (work_dir / "sub" / "dir").mkdir(parents=True)
    assert execute(daemon_client, "pwd", cwd=str(tmp_path)).json()["result"].strip() == str(tmp_path)
    relative = execute(daemon_client, "pwd", cwd="sub/dir").json()["result"].strip()
    assert relative == str(work_dir / "sub" / "dir")


def test_missing_cwd_is_400(daemon_client: httpx.Client) -> None:
    response = execute(daemon_client, "pwd", cwd="/definitely/not/here")
    assert response.status_code == 400
    assert "/definitely/not/here" in response.json()["message"]


def test_envs_are_added_to_container_environment(
    daemon_client: httpx.Client, container_env_marker: tuple[str, str]
) -> None:
    marker_name, marker_value = container_env_marker
    command = f'echo "$FIRST|$SECOND|${marker_name}"'
    body = execute(daemon_client, command, envs={"FIRST": "one", "SECOND": "two words"}).json()
    assert body["result"] == f"one|two words|{marker_value}\n"


def test_stderr_is_combined_in_order(daemon_client: httpx.Client) -> None:
    body = execute(daemon_client, "echo out1; echo err1 >&2; echo out2; echo err2 >&2").json()
    assert body["result"] == "out1\nerr1\nout2\nerr2\n"


def test_heredoc_and_multiline_script(daemon_client: httpx.Client) -> None:
    command = "cat <<'EOF'\nline one\nline $HOME two\nEOF\nx=5\necho \"x=$x\""
    body = execute(daemon_client, command).json()
    assert body["result"] == "line one\nline $HOME two\nx=5\n"


def test_large_script_is_fed_without_deadlock(daemon_client: httpx.Client) -> None:
    # Much larger than a pipe buffer, and it produces output while the script is still being written.
    command = "\n".join(f"echo line-{index}" for index in range(20000))
    body = execute(daemon_client, command).json()
    assert body["exitCode"] == 0
    assert body["result"].splitlines()[-1] == "line-19999"


def test_timeout_kills_and_returns_408(daemon_client: httpx.Client, work_dir: Path) -> None:
    # The shell and its background child record their pids, then would outlive any deadline of this test.
    command = "sleep 300 & echo $! > child.pid; echo $$ > shell.pid; sleep 300"
    response = execute(daemon_client, command, timeout=1)
    assert response.status_code == 408
    body = response.json()
    assert body["message"] == "request timeout: command execution timeout"
    assert body["code"] == "PROCESS_EXECUTION_TIMEOUT"
    assert body["source"] == "DAYTONA_DAEMON"
    assert body["termination"] == {"reason": "timeout", "signal": 9}
    pids = [int((work_dir / name).read_text()) for name in ("shell.pid", "child.pid")]
    wait_until_dead(pids, "the timed-out command's process group")


def test_nohup_background_with_redirect_returns_at_once(daemon_client: httpx.Client) -> None:
    body = execute(daemon_client, "nohup sleep 300 >/dev/null 2>&1 &\necho $!").json()
    assert body["exitCode"] == 0
    # The exec answered while its background job still runs: it did not wait for it.
    child = int(body["result"])
    try:
        assert process_alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_background_child_holding_the_pipe_returns_promptly(daemon_client: httpx.Client) -> None:
    # The daemon stops reading once the shell is gone and the pipe has been idle briefly (~0.1 s), so it
    # answers while the child still holds the pipe (how fast is measured by `make bench`).
    body = execute(daemon_client, "sleep 300 &\necho $!").json()
    assert body["exitCode"] == 0
    child = int(body["result"])
    try:
        assert process_alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_signal_death_is_reported(daemon_client: httpx.Client) -> None:
    body = execute(daemon_client, "kill -9 $$").json()
    assert body["termination"] == {"reason": "signal", "signal": 9}
    assert body["exitCode"] == 137


def test_invalid_bodies_are_400(daemon_client: httpx.Client) -> None:
    assert daemon_client.post("/process/execute", content=b"not json").status_code == 400
    assert daemon_client.post("/process/execute", json={"cwd": "/"}).status_code == 400
    assert daemon_client.post("/process/execute", json=["echo"]).status_code == 400
    assert execute(daemon_client, "echo", envs={"A": 1}).status_code == 400
    assert execute(daemon_client, "echo", timeout="soon").status_code == 400
    error = daemon_client.post("/process/execute", content=b"").json()
    assert error["statusCode"] == 400 and error["code"] == "BAD_REQUEST"


def test_long_exec_does_not_block_other_requests(daemon_client: httpx.Client, work_dir: Path) -> None:
    long_result: dict[str, Any] = {}
    # The long exec runs until the test opens the gate, which it does only after the quick one answered.
    long_command = "touch running; until [ -e gate ]; do sleep 0.05; done; echo slow"

    def run_long() -> None:
        long_result["body"] = execute(daemon_client, long_command, timeout=60).json()

    worker = threading.Thread(target=run_long)
    worker.start()
    try:
        wait_until((work_dir / "running").exists, "the long exec never started")
        quick = execute(daemon_client, "echo quick").json()
        assert quick["result"] == "quick\n"
        assert worker.is_alive() and "body" not in long_result
    finally:
        (work_dir / "gate").touch()
        worker.join(timeout=60)
    assert long_result["body"]["result"] == "slow\n"


def test_user_commands_get_default_sigpipe(daemon_client: httpx.Client) -> None:
    # Python ignores SIGPIPE in the daemon; children must get the default back, or `yes | head` would
    # print "Broken pipe" errors instead of ending quietly.
    body = execute(daemon_client, "yes | head -n 2", timeout=10).json()
    assert body["result"] == "y\ny\n"
    assert body["exitCode"] == 0


def test_many_concurrent_execs(daemon_client: httpx.Client) -> None:
    results: list[str] = []
    lock = threading.Lock()
    # A barrier: each exec finishes only once all 20 have started, so they must run at the same time (run
    # one after another, the first would time out).
    barrier = "touch s-$INDEX; until [ $(ls s-* | wc -l) -ge 20 ]; do sleep 0.05; done; echo $INDEX"

    def run(index: int) -> None:
        body = execute(daemon_client, barrier, envs={"INDEX": str(index)}, timeout=60).json()
        with lock:
            results.append(body.get("result", "").strip())

    workers = [threading.Thread(target=run, args=(index,)) for index in range(20)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=90)
    assert sorted(results, key=int) == [str(index) for index in range(20)]


def test_background_job_keeps_writing_after_the_response(daemon_client: httpx.Client, work_dir: Path) -> None:
    # The pipe it inherited is drained by the daemon after the response, never closed under it: a late
    # write must not kill it with SIGPIPE / BrokenPipeError (e.g. `nohup python3 -m http.server &`).
    # It writes only after the test saw the response and opened the gate.
    script = (
        "import os, time\nwhile not os.path.exists('gate'): time.sleep(0.05)\n"
        "print('late', flush=True)\nopen('alive', 'w')"
    )
    body = execute(daemon_client, f"python3 -c {shlex.quote(script)} &\necho launched", timeout=60).json()
    assert body["result"] == "launched\n"
    (work_dir / "gate").touch()
    wait_until((work_dir / "alive").exists, "the background job died when it wrote to its inherited pipe")


def test_terminations_are_recorded_for_the_runner(daemon_client: httpx.Client) -> None:
    daemon = daemon_client
    before = daemon.get("/process/terminations").json()
    last = max((record["sequence"] for record in before["records"]), default=0)
    assert daemon.post("/process/execute", json={"command": "sleep 5", "timeout": 1}).status_code == 408
    daemon.post("/process/execute", json={"command": "exit 3"})
    after = daemon.get("/process/terminations", params={"after": last}).json()
    assert after["bootId"] == before["bootId"]
    records = after["records"]
    assert [(r["kind"], r["reason"], r["exitCode"]) for r in records] == [
        ("exec", "timeout", 137),
        ("exec", "exited", 3),
    ]
    assert records[0]["command"] == "sleep 5" and records[0]["signal"] == 9
    assert daemon.get("/process/terminations", params={"after": "x"}).status_code == 400
