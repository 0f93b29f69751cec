"""A sandbox whose daemon cannot start gets a one-line error reason; the log tail goes to the runner's log."""

from __future__ import annotations

from tidepool_runner.container_backend import daemon_failure_reason

TRACEBACK_TAIL = """\
2026-12-01 07:00:00 ERROR tidepool_daemon cannot become the sandbox user daytona
Traceback (most recent call last):
  File "/opt/tidepool/daemon/tidepool_daemon/identity.py", line 21, in become_user
    entry = pwd.getpwnam(name)
KeyError: "getpwnam(): name not found: 'daytona'"
PermissionError: [Errno 13] Permission denied: '/etc/group'
2026-12-01 07:00:00 ERROR tidepool_daemon daemon cannot start: cannot set up the sandbox user 'daytona': \
cannot replace /etc/group (Permission denied)
2026-12-01 07:00:00 ERROR tidepool_daemon worker 7 cannot start; the daemon stops
"""


def test_the_daemons_own_reason_is_the_error_reason() -> None:
    assert daemon_failure_reason(TRACEBACK_TAIL) == (
        ": cannot set up the sandbox user 'daytona': cannot replace /etc/group (Permission denied)"
    )


def test_without_a_reason_only_the_last_line_that_is_no_traceback_frame_is_kept() -> None:
    tail = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\nOSError: disk full\n'
    assert daemon_failure_reason(tail) == "; last log line: OSError: disk full"
    assert daemon_failure_reason("") == ""
