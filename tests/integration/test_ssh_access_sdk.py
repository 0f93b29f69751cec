"""Issue #11 (SSH access): `ssh <token>@localhost -p <gateway port>` with the OpenSSH client, the token
from the official SDK's `create_ssh_access`.

Expiry (the API counts in whole minutes) is checked by unit tests with a moved clock
(tests/unit/ssh_gateway/test_grants.py); here: exec with its exit status, an interactive shell, a `nohup`
process outliving the connection, revocation and another organization's credentials.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import uuid
from collections.abc import Iterator

import asyncssh
import httpx
import pytest
from daytona import Daytona, Sandbox, SessionExecuteRequest

from tests.integration.stackthread import StackThread
from tests.polling import wait_until
from tidepool_stack.supervisor import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

FORWARDED_PORT = 8123
SSH_OPTIONS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
]


def ssh(
    stack: StackThread, token: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-p", str(stack.config.ssh_gateway_port), *SSH_OPTIONS, f"{token}@localhost", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def daytona() -> Daytona:
    return Daytona()


@pytest.fixture(scope="module")
def sandbox(daytona: Daytona) -> Iterator[Sandbox]:
    created = daytona.create()
    try:
        yield created
    finally:
        daytona.delete(created)


def test_create_returns_the_wire_dto_and_a_working_command(stack: StackThread, sandbox: Sandbox) -> None:
    access = sandbox.create_ssh_access(expires_in_minutes=30)
    assert access.sandbox_id == sandbox.id
    assert len(access.token) == 32 and access.token.isalnum()
    assert access.ssh_command == f"ssh -p {stack.config.ssh_gateway_port} {access.token}@localhost"
    assert 29 * 60 <= (access.expires_at - access.created_at).total_seconds() <= 30 * 60 + 1
    validation = sandbox.validate_ssh_access(access.token)
    assert validation.valid and validation.sandbox_id == sandbox.id


def test_exec_returns_output_and_exit_status(stack: StackThread, sandbox: Sandbox) -> None:
    token = sandbox.create_ssh_access().token
    result = ssh(stack, token, "echo hi; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "hi"
    assert ssh(stack, token, "whoami").stdout.strip() == "daytona"


def test_interactive_shell_with_a_pty(stack: StackThread, sandbox: Sandbox) -> None:
    token = sandbox.create_ssh_access().token
    result = ssh(stack, token, "-tt", stdin="tty\necho shell-$((6*7))\nexit 5\n")
    assert "shell-42" in result.stdout, result.stdout + result.stderr
    assert "/dev/pts/" in result.stdout
    assert result.returncode == 5, result.stdout + result.stderr


def test_nohup_process_survives_the_disconnect(stack: StackThread, sandbox: Sandbox) -> None:
    token = sandbox.create_ssh_access().token
    # Unique durations name the processes for pgrep.
    from_exec, from_shell = (600_000 + random.randrange(100_000) for _ in range(2))
    started = ssh(stack, token, f"nohup sleep {from_exec} >/dev/null 2>&1 & echo started")
    assert started.returncode == 0 and "started" in started.stdout, started.stderr
    shell = ssh(stack, token, "-tt", stdin=f"nohup sleep {from_shell} >/dev/null 2>&1 &\nexit\n")
    assert shell.returncode == 0, shell.stdout + shell.stderr
    for seconds in (from_exec, from_shell):
        survivors = sandbox.process.exec(f"pgrep -f 'sleep {seconds}' || true").result.split()
        assert survivors, f"`nohup sleep {seconds}` did not outlive the SSH connection"
        sandbox.process.exec(f"pkill -f 'sleep {seconds}' || true")


def test_revoked_token_is_refused(stack: StackThread, sandbox: Sandbox) -> None:
    token = sandbox.create_ssh_access().token
    assert ssh(stack, token, "true").returncode == 0
    sandbox.revoke_ssh_access(token)
    refused = ssh(stack, token, "echo should-not-run")
    assert refused.returncode == 255 and "should-not-run" not in refused.stdout
    assert "Permission denied" in refused.stderr
    assert not sandbox.validate_ssh_access(token).valid


def test_an_expired_token_is_refused(stack: StackThread, sandbox: Sandbox) -> None:
    """The shortest lifetime (one minute): it works, then the OpenSSH client is refused once it is over."""
    access = sandbox.create_ssh_access(expires_in_minutes=1)
    assert ssh(stack, access.token, "true").returncode == 0

    def refused() -> bool:
        answer = ssh(stack, access.token, "true")
        return answer.returncode == 255 and "Permission denied" in answer.stderr

    wait_until(refused, "an expired SSH token still opened a shell", timeout=150, interval=5)
    answer = ssh(stack, access.token, "echo should-not-run")
    assert answer.returncode == 255 and "should-not-run" not in answer.stdout, answer.stdout
    assert not sandbox.validate_ssh_access(access.token).valid


def test_a_new_token_revokes_the_earlier_ones(stack: StackThread, sandbox: Sandbox) -> None:
    first = sandbox.create_ssh_access().token
    second = sandbox.create_ssh_access().token
    assert ssh(stack, first, "true").returncode == 255
    assert ssh(stack, second, "true").returncode == 0


def test_unknown_token_is_refused(stack: StackThread) -> None:
    refused = ssh(stack, "A" * 32, "echo should-not-run")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr


def test_another_organization_cannot_reach_the_sandbox(
    stack: StackThread, sandbox: Sandbox, tenant: Daytona, tenant_key: str
) -> None:
    token = sandbox.create_ssh_access().token
    # The tenant cannot make a token for this sandbox, nor learn anything from ours.
    other = httpx.post(
        f"{stack.api_url}/sandbox/{sandbox.id}/ssh-access",
        headers={"Authorization": f"Bearer {tenant_key}"},
    )
    assert other.status_code == 404
    seen = httpx.get(
        f"{stack.api_url}/sandbox/ssh-access/validate",
        params={"token": token},
        headers={"Authorization": f"Bearer {tenant_key}"},
    )
    assert seen.status_code == 200 and seen.json() == {"valid": False, "sandboxId": ""}
    # The tenant's own token opens the tenant's sandbox only: the user name is all the gateway trusts.
    own = tenant.create()
    try:
        own_token = own.create_ssh_access().token
        result = ssh(stack, own_token, "cat /etc/hostname 2>/dev/null; hostname")
        assert result.returncode == 0
        mine = ssh(stack, token, "hostname").stdout.strip()
        assert mine and mine not in result.stdout
    finally:
        tenant.delete(own)
    # A deleted sandbox's tokens open nothing.
    refused = ssh(stack, own_token, "echo should-not-run")
    assert refused.returncode == 255 and "should-not-run" not in refused.stdout


def test_local_port_forwarding_reaches_a_server_in_the_sandbox(stack: StackThread, sandbox: Sandbox) -> None:
    sandbox.fs.upload_file(b"forwarded through ssh\n", "/home/daytona/fwd/hello.txt")
    session = f"fwd-{uuid.uuid4().hex[:6]}"
    sandbox.process.create_session(session)
    sandbox.process.execute_session_command(
        session,
        SessionExecuteRequest(
            command=f"cd /home/daytona/fwd && python3 -m http.server {FORWARDED_PORT}", run_async=True
        ),
    )
    wait_until(
        lambda: (
            sandbox.process.exec(
                f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {FORWARDED_PORT}), 1)\""
            ).exit_code
            == 0
        ),
        "the server in the sandbox never listened",
    )
    token = sandbox.create_ssh_access().token
    local = free_port()
    forwarder = subprocess.Popen(
        [
            "ssh", "-N", "-p", str(stack.config.ssh_gateway_port), *SSH_OPTIONS,
            "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{local}:localhost:{FORWARDED_PORT}",
            f"{token}@localhost",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def fetched() -> str | None:
            assert forwarder.poll() is None, forwarder.stderr.read() if forwarder.stderr else ""
            try:
                return httpx.get(f"http://127.0.0.1:{local}/hello.txt", timeout=10).text
            except httpx.TransportError:
                return None

        assert wait_until(fetched, "the forwarded port never answered") == "forwarded through ssh\n"
        # Several connections over the same SSH connection.
        for _ in range(3):
            assert httpx.get(f"http://127.0.0.1:{local}/hello.txt", timeout=10).status_code == 200
    finally:
        forwarder.terminate()
        forwarder.wait(timeout=30)


def test_terminal_size_and_window_changes_reach_the_pty(stack: StackThread, sandbox: Sandbox) -> None:
    """With an SSH client that has a real terminal size (asyncssh here): the PTY starts at it and follows
    window changes (`stty size` prints rows and columns)."""
    token = sandbox.create_ssh_access().token

    async def sizes() -> tuple[str, str]:
        async with asyncssh.connect(
            "127.0.0.1", stack.config.ssh_gateway_port, username=token, known_hosts=None, client_keys=None
        ) as connection:
            process = await connection.create_process(term_type="xterm", term_size=(100, 40))

            async def size(number: int) -> str:
                # The marker is computed by the shell, so the echoed command line never matches it.
                process.stdin.write(f"echo M$(({number}+1)):$(stty size):E$(({number}+2))\n")
                pattern = re.compile(rf"M{number + 1}:([0-9 ]+):E{number + 2}")
                seen = ""
                while (found := pattern.search(seen)) is None:
                    seen += await asyncio.wait_for(process.stdout.read(4096), 60)
                return found.group(1).strip()

            first = await size(10)
            process.change_terminal_size(120, 50)
            second = await size(20)
            process.stdin.write("exit\n")
            await process.wait_closed()
            return first, second

    first, second = asyncio.run(sizes())
    assert first == "40 100"
    assert second == "50 120"
