"""Any image works (issue #15): the toolbox daemon brings its own runtime, so sandboxes start from images
without python3, without glibc and without a shell, through the official SDK on a real stack.

Images, built locally from Debian's packages (no Docker Hub here), once per session store-wide:
- minbase: Debian bookworm minbase (the platform's base image): bash, glibc, no python3;
- busybox-musl: a scratch image with Debian's busybox-static and musl loader, standing for Alpine (no glibc);
- distroless: a scratch image with one static program as its CMD and nothing else: no /etc (no passwd, no
  group), no /tmp, no shell, no python, no libc;
- python: the python:3.12-slim stand-in (Debian's python3, another build than the toolbox runtime's).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daytona import (
    CreateSandboxFromImageParams,
    Daytona,
    DaytonaBadRequestError,
    DaytonaError,
    Image,
    PtySize,
    Sandbox,
    SessionExecuteRequest,
)
from daytona.handle.pty_handle import PtyHandle

from tests.integration.images_fixture import (
    BASE_IMAGE,
    DISTROLESS_CMD,
    ensure_busybox_musl_image,
    ensure_distroless_image,
    ensure_python_slim_stand_in,
)
from tests.integration.stackthread import StackThread

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

# Variables a runtime would need if it were started the usual way: none may reach a user process.
RUNTIME_VARIABLES = ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONPATH", "LC_CTYPE")
RUNTIME_MOUNT = "/opt/tidepool/runtime"
SHELL_IMAGES = ("minbase", "busybox-musl")
IMAGES_WITHOUT_PYTHON = ("minbase", "busybox-musl", "distroless")


@pytest.fixture(scope="module")
def sandboxes(stack: StackThread) -> Iterator[dict[str, Sandbox]]:
    images = {
        "minbase": BASE_IMAGE,
        "busybox-musl": ensure_busybox_musl_image(),
        "distroless": ensure_distroless_image(),
        "python": ensure_python_slim_stand_in(),
    }
    daytona = Daytona()
    created: dict[str, Sandbox] = {}
    try:
        for kind, image in images.items():
            created[kind] = daytona.create(CreateSandboxFromImageParams(image=Image.base(image)), timeout=600)
        yield created
    finally:
        for sandbox in created.values():
            daytona.delete(sandbox)


def read_pty_until(handle: PtyHandle, needle: bytes, timeout: float = 20) -> bytes:
    received = bytearray()
    deadline = time.monotonic() + timeout
    while needle not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} not seen in {bytes(received[-2000:])!r}")
        handle.wait(on_data=received.extend, timeout=min(remaining, 1.0))
        assert handle.exit_code is None or needle in received, f"PTY exited early: {bytes(received)!r}"
    return bytes(received)


def assert_clean_environment(env_lines: str) -> None:
    env = dict(line.split("=", 1) for line in env_lines.splitlines() if "=" in line)
    assert env, env_lines
    leaked = [name for name in RUNTIME_VARIABLES if name in env]
    assert leaked == [], env
    assert RUNTIME_MOUNT not in env.get("PATH", ""), env


@pytest.mark.parametrize("kind", ["minbase", "busybox-musl", "distroless", "python"])
def test_files_upload_and_download_on_every_image(sandboxes: dict[str, Sandbox], kind: str) -> None:
    sandbox = sandboxes[kind]
    assert sandbox.state == "started"
    payload = f"{kind} {uuid.uuid4().hex}\n".encode() + bytes(range(256))
    sandbox.fs.upload_file(payload, "/tmp/any-image.bin")
    assert sandbox.fs.download_file("/tmp/any-image.bin") == payload
    # Relative to the sandbox user's home, which the daemon made (no useradd in most of these images).
    sandbox.fs.upload_file(b"at home", "notes.txt")
    assert sandbox.fs.download_file(f"{sandbox.get_user_home_dir()}/notes.txt") == b"at home"
    assert "notes.txt" in {entry.name for entry in sandbox.fs.list_files(sandbox.get_user_home_dir())}


@pytest.mark.parametrize("kind", SHELL_IMAGES)
def test_exec_session_and_pty_where_the_image_has_a_shell(sandboxes: dict[str, Sandbox], kind: str) -> None:
    sandbox = sandboxes[kind]
    assert sandbox.process.exec("true").exit_code == 0
    ran = sandbox.process.exec("echo shell-$((6 * 7)); whoami")
    assert (ran.exit_code, ran.result.split()) == (0, ["shell-42", "daytona"])
    assert_clean_environment(sandbox.process.exec("env").result)

    session = f"s-{uuid.uuid4().hex[:6]}"
    sandbox.process.create_session(session)
    command = sandbox.process.execute_session_command(
        session, SessionExecuteRequest(command="echo in-$((1 + 1))")
    )
    assert command.exit_code == 0
    assert (command.stdout or command.output or "").strip() == "in-2"
    in_session = sandbox.process.execute_session_command(session, SessionExecuteRequest(command="env"))
    assert_clean_environment(in_session.stdout or in_session.output or "")

    handle = sandbox.process.create_pty_session(
        f"p-{uuid.uuid4().hex[:6]}", pty_size=PtySize(rows=24, cols=80)
    )
    try:
        handle.send_input('printf "pty-%s\\n" works; stty size\n')
        assert b"pty-works" in read_pty_until(handle, b"24 80")
        handle.send_input("exit\n")
        assert handle.wait(timeout=20).exit_code == 0
    finally:
        handle.disconnect()


def test_the_musl_image_has_no_glibc_and_the_daemon_still_serves(sandboxes: dict[str, Sandbox]) -> None:
    sandbox = sandboxes["busybox-musl"]
    listing = sandbox.process.exec("ls -R /lib /bin; ls /usr /lib64 2>&1").result
    assert "ld-musl-x86_64.so.1" in listing
    assert "libc.so.6" not in listing and "ld-linux" not in listing, listing


def test_without_a_shell_exec_sessions_and_pty_name_the_missing_shell(sandboxes: dict[str, Sandbox]) -> None:
    sandbox = sandboxes["distroless"]
    with pytest.raises(DaytonaError, match="/bin/sh"):
        sandbox.process.exec("true")
    session = f"s-{uuid.uuid4().hex[:6]}"
    sandbox.process.create_session(session)
    with pytest.raises(DaytonaError, match="no /bin/sh"):
        sandbox.process.execute_session_command(session, SessionExecuteRequest(command="true"))
    with pytest.raises(DaytonaError, match="no /bin/sh"):
        sandbox.process.create_pty_session(f"p-{uuid.uuid4().hex[:6]}", pty_size=PtySize(rows=24, cols=80))
    # Everything else keeps working, and the sandbox is fine.
    sandbox.fs.upload_file(b"still here", "/tmp/after.txt")
    assert sandbox.fs.download_file("/tmp/after.txt") == b"still here"
    sandbox.refresh_data()
    assert sandbox.state == "started"


@pytest.mark.parametrize("kind", IMAGES_WITHOUT_PYTHON)
def test_code_run_without_python_fails_naming_python3(sandboxes: dict[str, Sandbox], kind: str) -> None:
    sandbox = sandboxes[kind]
    response = sandbox.process.code_run("print('never')")
    assert response.exit_code != 0
    assert "python3" in response.result and "never" not in response.result, response.result
    failed = sandbox.code_interpreter.run_code("print('never')")
    assert failed.error is not None and "python3" in failed.error.value, failed
    sandbox.refresh_data()
    assert sandbox.state == "started"
    # The toolbox's own interpreter is not offered to the user either.
    if kind in SHELL_IMAGES:
        assert sandbox.process.exec("command -v python3 python").result.strip() == ""


@pytest.mark.parametrize("kind", IMAGES_WITHOUT_PYTHON)
def test_git_without_git_names_it(sandboxes: dict[str, Sandbox], kind: str) -> None:
    # The image's limit, not a server error: HTTP 400, which the SDK raises as DaytonaBadRequestError.
    with pytest.raises(DaytonaBadRequestError, match="git is not installed"):
        sandboxes[kind].git.status("/tmp")


def test_an_image_without_etc_and_tmp_gets_roots_account_files_and_a_tmp(
    sandboxes: dict[str, Sandbox],
) -> None:
    """No /etc/passwd, /etc/group (not even /etc) nor /tmp in the image: the sandbox user exists, its account
    files are the sandbox root's and readable, and the daemon's session folders are not in the user's
    files."""
    sandbox = sandboxes["distroless"]
    assert sandbox.get_user_home_dir() == "/home/daytona"
    for account_file in ("/etc/passwd", "/etc/group"):
        info = sandbox.fs.get_file_info(account_file)
        assert (info.owner, info.permissions) == ("0", "0644"), (account_file, info)
        assert b"daytona:x:" in sandbox.fs.download_file(account_file)
    assert sandbox.fs.get_file_info("/tmp").permissions == "1777"
    session = f"s-{uuid.uuid4().hex[:6]}"
    sandbox.process.create_session(session)
    try:
        names = {entry.name for entry in sandbox.fs.list_files(".")}
        assert not [name for name in names if name.startswith("tidepool-session-")], names
    finally:
        sandbox.process.delete_session(session)


def test_an_entrypoint_that_cannot_run_says_why_in_its_log(sandboxes: dict[str, Sandbox]) -> None:
    logs = sandboxes["distroless"].process.get_entrypoint_logs()
    assert f"entrypoint {' '.join(DISTROLESS_CMD)} did not run" in logs.output, logs
    assert "no /bin/sh" in logs.output, logs


def test_a_built_scratch_image_keeps_copied_modes_and_becomes_a_sandbox(
    stack: StackThread, tmp_path: Path
) -> None:
    """A Dockerfile `FROM <scratch image>` + COPY through the builder (the SDK uploads the context as a tar):
    the copied file keeps its executable bits, and the image without /etc becomes a usable sandbox."""
    program = tmp_path / "hello"
    program.write_bytes(b"\x7fELF not really\n")
    program.chmod(0o755)
    daytona = Daytona()
    image = Image.base(ensure_distroless_image()).add_local_file(program, "/app/hello")
    sandbox = daytona.create(CreateSandboxFromImageParams(image=image), timeout=600)
    try:
        assert sandbox.state == "started"
        assert sandbox.fs.get_file_info("/app/hello").permissions == "0755"
        group = sandbox.fs.get_file_info("/etc/group")
        assert (group.owner, group.permissions) == ("0", "0644")
        with pytest.raises(DaytonaBadRequestError, match="no /bin/sh"):
            sandbox.process.exec("true")
    finally:
        daytona.delete(sandbox)


def test_code_run_uses_the_images_own_python(sandboxes: dict[str, Sandbox]) -> None:
    sandbox = sandboxes["python"]
    # The environment as the program was given it: a python's own locale coercion is not the runtime's.
    probe = (
        "import json, sys as s;"
        'print(json.dumps([s.executable, s.version_info[:3], open("/proc/self/environ").read()]))'
    )
    own = json.loads(sandbox.process.exec(f"python3 -c '{probe}'").result)
    ran = sandbox.process.code_run(probe)
    assert ran.exit_code == 0, ran.result
    executable, version, env = json.loads(ran.result)
    assert (executable, version) == (own[0], own[1])
    assert executable.startswith("/usr/") and not executable.startswith(RUNTIME_MOUNT)
    assert_clean_environment(env.replace("\0", "\n"))

    result = sandbox.code_interpreter.run_code(probe)
    assert result.error is None, result.error
    interpreter_executable, interpreter_version, _ = json.loads(result.stdout)
    assert (interpreter_executable, interpreter_version) == (own[0], own[1])
