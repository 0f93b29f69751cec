"""Any image works (issue #15): images without /etc/group, /tmp, a shell or git give a usable sandbox, or
a clear one-line reason and no restart loop when they cannot."""

from __future__ import annotations

import argparse
import email.message
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tidepool_daemon import identity, worker
from tidepool_daemon.context import DaemonContext
from tidepool_daemon.errors import DaemonError
from tidepool_daemon.git.commands import GitCommands
from tidepool_daemon.httpd.http_io import Request, RequestBody
from tidepool_daemon.process import execute, session_shell
from tidepool_daemon.process.sessions import SessionService
from tidepool_daemon.supervisor import EXIT_CANNOT_START, FATAL_MARKER, Supervisor, parse_args

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes files of another owner (needs root)")


@needs_root
def test_account_file_of_the_engine_is_replaced_by_roots_readable_one(tmp_path: Path) -> None:
    """The engine left /etc/group owned by `nobody` with mode 0600: the sandbox's root can neither append to
    it nor chown it, so it is replaced by one of root's, mode 0644, keeping its lines."""
    group = tmp_path / "group"
    group.write_text("root:x:0:\n")
    os.chown(group, NOBODY, NOBODY)
    group.chmod(0o600)
    identity.append_account_line(str(group), "daytona:x:1000:\n")
    info = group.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644)
    assert group.read_text() == "root:x:0:\ndaytona:x:1000:\n"
    assert [path.name for path in tmp_path.iterdir()] == ["group"], "no temporary file is left"


def test_account_file_is_made_when_the_image_has_no_etc(tmp_path: Path) -> None:
    passwd = tmp_path / "etc" / "passwd"
    identity.append_account_line(str(passwd), "daytona:x:1000:1000::/home/daytona:/bin/sh\n")
    assert passwd.read_text() == "daytona:x:1000:1000::/home/daytona:/bin/sh\n"
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o644


def test_account_file_that_cannot_be_replaced_gives_a_one_line_reason(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.write_text("not a folder")
    with pytest.raises(identity.AccountFileError) as raised:
        identity.append_account_line(str(etc / "group"), "daytona:x:1000:\n")
    assert "\n" not in str(raised.value) and str(etc) in str(raised.value)


def test_missing_tmp_is_made_world_writable_and_sticky(tmp_path: Path) -> None:
    """Without /tmp, tempfile falls back to the current folder (the user's home), where the daemon's session
    folders would show among the user's files."""
    tmp = tmp_path / "tmp"
    identity.ensure_tmp_dir(str(tmp))
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o1777


def test_worker_that_cannot_become_the_user_exits_with_a_one_line_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def become_user(name: str) -> None:
        raise PermissionError(13, "Permission denied", "/etc/group")

    monkeypatch.setattr(worker, "become_user", become_user)
    args = argparse.Namespace(listen_fd=[], user="daytona", entrypoint_json="", socket=None, tcp=None)
    with caplog.at_level(logging.INFO):
        assert worker.serve(args) == EXIT_CANNOT_START
    reasons = [record.getMessage() for record in caplog.records if FATAL_MARKER in record.getMessage()]
    assert len(reasons) == 1 and "\n" not in reasons[0], reasons
    assert "'daytona'" in reasons[0] and "Permission denied: '/etc/group'" in reasons[0]


def test_supervisor_stops_when_the_first_worker_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endless restart loop: a worker that can never serve ends the daemon (and the container)."""
    supervisor = Supervisor(parse_args(["--socket", "/nonexistent/toolbox.sock"]))
    attempts: list[bool] = []

    def spawn(first: bool) -> subprocess.Popen[bytes]:
        attempts.append(first)
        if len(attempts) > 1:
            supervisor._stopping = True  # the old behaviour: restarted; stop it here so the test ends
        return subprocess.Popen(["sh", "-c", f"exit {EXIT_CANNOT_START}"])

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    monkeypatch.setattr(supervisor, "_wait_for_worker", lambda process: process.wait())
    supervisor._supervise()
    assert attempts == [True]
    assert supervisor.exit_code == EXIT_CANNOT_START


def _context(
    tmp_path: Path, env: dict[str, str] | None = None, entrypoint: tuple[str, ...] = ()
) -> DaemonContext:
    return DaemonContext(str(tmp_path), str(tmp_path), env or dict(os.environ), entrypoint)


def test_exec_without_a_shell_is_a_bad_request_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(execute, "COMMAND_SHELL", str(tmp_path / "no-sh"))
    with pytest.raises(DaemonError) as raised:
        execute.run_shell_command("echo hi", str(tmp_path), dict(os.environ), None)
    assert raised.value.status == 400
    assert f"this sandbox's image has no {tmp_path / 'no-sh'}" in raised.value.message


def test_git_missing_is_a_bad_request_naming_it(tmp_path: Path) -> None:
    commands = GitCommands(_context(tmp_path, {"PATH": str(tmp_path), "HOME": str(tmp_path)}))
    with pytest.raises(DaemonError) as raised:
        commands.run(["status"])
    assert raised.value.status == 400
    assert "git is not installed" in raised.value.message


def test_entrypoint_that_cannot_run_says_why_in_its_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(session_shell, "COMMAND_SHELL", str(tmp_path / "no-sh"))
    routes = SessionService(_context(tmp_path, entrypoint=("/hello",)))
    try:
        request = Request(
            "GET", "/process/session/entrypoint/logs", {}, email.message.Message(), RequestBody()
        )
        response = routes.entrypoint_logs(request)
    finally:
        routes.close_all()
    assert response.status == 200
    body = response.body if isinstance(response.body, bytes) else b"".join(response.body)
    assert b"/hello did not run" in body and b"no-sh" in body
