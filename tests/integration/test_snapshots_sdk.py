"""Snapshots and declarative builds through the official SDK (issue: snapshots and the builder)."""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest
from daytona import (
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    Daytona,
    DaytonaConflictError,
    DaytonaError,
    DaytonaNotFoundError,
    Image,
)

from tests.integration.images_fixture import ensure_python_slim_stand_in
from tests.integration.stackthread import StackThread
from tests.polling import wait_until
from tidepool_runtime.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def python_slim() -> str:
    return ensure_python_slim_stand_in()


def test_snapshot_from_image_reference(stack: StackThread, python_slim: str) -> None:
    daytona = Daytona()
    name = unique("from-ref")
    snapshot = daytona.snapshot.create(CreateSnapshotParams(name=name, image=python_slim))
    assert snapshot.state == "active"
    assert daytona.snapshot.get(name).id == snapshot.id
    assert name in {item.name for item in daytona.snapshot.list().items}
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name))
    try:
        assert sandbox.process.exec("python3 -c 'print(6*7)'").result.strip() == "42"
        with pytest.raises(DaytonaConflictError):
            daytona.snapshot.delete(snapshot)
    finally:
        daytona.delete(sandbox)

    def deleted() -> bool:
        try:
            daytona.snapshot.delete(snapshot)
        except DaytonaConflictError:
            return False  # the deleted sandbox still counts as a user for a moment
        return True

    wait_until(deleted, "the snapshot stayed in use after its sandbox was deleted", interval=0.5)
    with pytest.raises(DaytonaNotFoundError):
        daytona.snapshot.get(name)


def test_snapshot_image_rules(stack: StackThread) -> None:
    daytona = Daytona()
    with pytest.raises(DaytonaError, match="latest"):
        daytona.snapshot.create(CreateSnapshotParams(name=unique("latest"), image="python:latest"))
    with pytest.raises(DaytonaError, match="tag or a digest"):
        daytona.snapshot.create(CreateSnapshotParams(name=unique("untagged"), image="python"))
    # An image without python3 hosts the toolbox too (the daemon brings its own runtime, issue #15):
    # the snapshot becomes active instead of failing; test_any_image_sdk runs sandboxes from such images.
    snapshot = daytona.snapshot.create(
        CreateSnapshotParams(name=unique("no-python"), image="localhost/tidepool/base:bookworm")
    )
    try:
        assert snapshot.state == "active", snapshot.error_reason
    finally:
        daytona.snapshot.delete(snapshot)


def test_declarative_image_build_streams_logs_and_caches(stack: StackThread, python_slim: str) -> None:
    daytona = Daytona()
    image = Image.debian_slim("3.12").pip_install(["six"]).env({"TIDEPOOL_TEST": "declarative"})
    logs: list[str] = []
    sandbox = daytona.create(
        CreateSandboxFromImageParams(image=image), on_snapshot_create_logs=logs.append, timeout=900
    )
    headers = {"Authorization": f"Bearer {stack.api_key}"}

    def build_log(sandbox_id: str) -> str:
        response = httpx.get(f"{stack.api_url}/sandbox/{sandbox_id}/build-logs", headers=headers)
        assert response.status_code == 200, response.text
        return response.text

    try:
        assert sandbox.state == "started"
        assert any(line.strip() for line in logs), "build logs must stream while building"
        assert sandbox.process.exec("python3 -c 'import six; print(six.__name__)'").result.strip() == "six"
        assert sandbox.process.exec("echo $TIDEPOOL_TEST").result.strip() == "declarative"
        first_log = build_log(sandbox.id)
        assert "STEP 1/" in first_log or "Using cached image" in first_log
    finally:
        daytona.delete(sandbox)
    again = daytona.create(CreateSandboxFromImageParams(image=image), timeout=120)
    try:
        assert again.state == "started"
        assert again.build_info is not None and sandbox.build_info is not None
        assert again.build_info.snapshot_ref == sandbox.build_info.snapshot_ref, "content-addressed image ref"
        assert build_log(again.id).count("STEP 1/") == first_log.count("STEP 1/"), (
            "an identical declarative image must come from the cache, not be built again"
        )
    finally:
        daytona.delete(again)


def test_snapshot_from_declarative_image_with_logs(stack: StackThread, python_slim: str) -> None:
    daytona = Daytona()
    name = unique("declarative")
    logs: list[str] = []
    marker = f"building-{name}"  # unique content: a real build, not a cache hit
    # The SDK streams logs only if it sees the snapshot building (it polls every second): build for a while.
    image = Image.base(python_slim).run_commands(f"sleep 4 && echo {marker}")
    snapshot = daytona.snapshot.create(CreateSnapshotParams(name=name, image=image), on_logs=logs.append)
    assert snapshot.state == "active"
    assert any(marker in line for line in logs)
    replay = httpx.get(
        f"{stack.api_url}/snapshots/{snapshot.id}/build-logs",
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    assert replay.status_code == 200 and marker in replay.text, "logs replay from the start"
    daytona.snapshot.delete(snapshot)


def test_bad_dockerfile_fails_the_build_with_its_step(stack: StackThread, python_slim: str) -> None:
    daytona = Daytona()
    image = Image.base(python_slim).run_commands("echo about-to-fail && exit 3")
    with pytest.raises(DaytonaError, match=r"(?i)build_failed.*exit 3"):
        daytona.create(CreateSandboxFromImageParams(image=image), timeout=300)
    name = unique("broken")
    with pytest.raises(DaytonaError) as failure:
        daytona.snapshot.create(CreateSnapshotParams(name=name, image=image))
    assert "exit 3" in str(failure.value) or "exit status 3" in str(failure.value)


def test_builder_crash_during_build_is_retried(stack: StackThread, python_slim: str) -> None:
    daytona = Daytona()
    name = unique("crash")
    image = Image.base(python_slim).run_commands(f"sleep 6 && echo {name}")
    result: dict[str, object] = {}

    def create() -> None:
        try:
            result["snapshot"] = daytona.snapshot.create(
                CreateSnapshotParams(name=name, image=image), timeout=300
            )
        except Exception as error:  # reported below
            result["error"] = error

    worker = threading.Thread(target=create)
    worker.start()

    def building() -> bool:
        try:
            return daytona.snapshot.get(name).state == "building"
        except DaytonaNotFoundError:
            return False

    wait_until(building, "the snapshot never started building", timeout=60, interval=0.2)
    stack.kill("builder")  # returns once the process is gone
    stack.restart("builder")
    worker.join(timeout=400)
    assert "error" not in result, f"build after a builder crash failed: {result.get('error')}"
    assert daytona.snapshot.get(name).state == "active"
    daytona.snapshot.delete(name)


def test_declarative_image_with_local_context(stack: StackThread, python_slim: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`add_local_file` pushes the context to object storage (https); the builder fetches it by hash."""
    daytona = Daytona()
    config = tmp_path / "cfg.toml"
    content = f"token = '{uuid.uuid4().hex}'\n"
    config.write_text(content)
    name = unique("with-context")
    image = (
        Image.base(python_slim)
        .pip_install(["six"])
        .add_local_file(config, "/home/daytona/cfg.toml")
        .workdir("/home/daytona")
    )
    logs: list[str] = []
    snapshot = daytona.snapshot.create(CreateSnapshotParams(name=name, image=image), on_logs=logs.append)
    assert snapshot.state == "active"
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name))
    try:
        assert sandbox.fs.download_file("/home/daytona/cfg.toml").decode() == content
        assert sandbox.process.exec("python3 -c 'import six'").exit_code == 0
    finally:
        daytona.delete(sandbox)


def test_snapshot_entrypoint_runs_in_the_entrypoint_session(stack: StackThread, python_slim: str) -> None:
    daytona = Daytona()
    name = unique("entrypoint")
    server = [
        "python3",
        "-c",
        "print('entrypoint-up', flush=True); import http.server as s; "
        "s.test(s.SimpleHTTPRequestHandler, port=8080)",
    ]
    daytona.snapshot.create(CreateSnapshotParams(name=name, image=python_slim, entrypoint=server))
    sandbox = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name))
    try:
        probe = (
            "import time, urllib.request\n"
            "for _ in range(50):\n"
            "    try:\n"
            "        print(urllib.request.urlopen('http://127.0.0.1:8080').status); break\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
        )
        assert sandbox.process.exec(f"python3 - <<'EOF'\n{probe}EOF").result.strip() == "200"
        session = sandbox.process.get_entrypoint_session()
        assert session.session_id == "entrypoint" and len(session.commands) == 1
        assert "entrypoint-up" in sandbox.process.get_entrypoint_logs().stdout
    finally:
        daytona.delete(sandbox)


def test_image_workdir_and_env_are_honoured(stack: StackThread, python_slim: str) -> None:
    """Issue #19 item 3: the default working directory is the image's WORKDIR (else the user's home), for
    every way to run something and for relative paths; the image's ENV reaches every command."""
    daytona = Daytona()
    # On the default image, as the README suggests where Docker Hub is out of reach (its user has sudo).
    image = (
        Image.base(Settings(_env_file=None).default_image)
        .run_commands("sudo mkdir -p /opt/app && sudo chmod 0777 /opt/app && echo seed > /opt/app/seed.txt")
        .workdir("/opt/app")
        .env({"TIDEPOOL_IMAGE_ENV": "from-image"})
    )
    sandbox = daytona.create(CreateSandboxFromImageParams(image=image), timeout=600)
    plain = daytona.create(CreateSandboxFromImageParams(image=Image.base(python_slim)), timeout=600)
    try:
        assert sandbox.get_work_dir() == "/opt/app"
        assert sandbox.process.exec("pwd").result.strip() == "/opt/app"
        assert sandbox.process.exec("echo $TIDEPOOL_IMAGE_ENV").result.strip() == "from-image"
        assert sandbox.process.code_run("import os; print(os.getcwd())").result.strip() == "/opt/app"
        sandbox.process.create_session("wd")
        from daytona import SessionExecuteRequest

        ran = sandbox.process.execute_session_command("wd", SessionExecuteRequest(command="pwd"))
        assert (ran.stdout or ran.output or "").strip() == "/opt/app"
        # Relative paths resolve against it.
        assert sandbox.fs.download_file("seed.txt") == b"seed\n"
        sandbox.fs.upload_file(b"new", "made-here.txt")
        assert sandbox.process.exec("cat /opt/app/made-here.txt").result == "new"
        # The user and their home are still the sandbox's.
        assert sandbox.get_user_home_dir() == "/home/daytona"
        assert sandbox.process.exec("whoami").result.strip() == "daytona"
        # An image without WORKDIR: the user's home.
        assert plain.get_work_dir() == "/home/daytona"
        assert plain.process.exec("pwd").result.strip() == "/home/daytona"
    finally:
        daytona.delete(sandbox)
        daytona.delete(plain)
