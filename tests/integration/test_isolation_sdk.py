"""Issue #7: tenants isolated in the compute plane, attacked as the issue's attacker did.

The attacker holds one tenant's own API key (a fresh organization here), uses the official SDK and runs
code in its own sandbox, where `sudo` makes it the sandbox's root. Item 5 (builds and images) and item 6
(network) have their own test files; item 8 (a wedged toolbox) is in the daemon's and runner's tests.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from daytona import Daytona, Sandbox, SessionExecuteRequest

from tests.integration.stackthread import StackThread
from tidepool_runtime.settings import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

GIB = 1024**3
# Capability bits (linux/capability.h) a sandbox's root must not hold.
FORBIDDEN_CAPABILITIES = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_MODULE": 16, "SYS_ADMIN": 21, "MKNOD": 27}
USERNS_SIZE = 65536
# More toolbox calls at once than the runner has pooled connections to the sandbox: some must connect anew.
CONCURRENT_CALLS = 24


@pytest.fixture(scope="module")
def attacker(tenant: Daytona) -> Iterator[Sandbox]:
    sandbox = tenant.create()
    try:
        yield sandbox
    finally:
        tenant.delete(sandbox)


@pytest.fixture(scope="module")
def neighbour() -> Iterator[Sandbox]:
    """A sandbox of the admin organization: another tenant, next to the attacker on the same runner."""
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        yield sandbox
    finally:
        daytona.delete(sandbox)


def run(sandbox: Sandbox, command: str, timeout: int = 60) -> tuple[int, str]:
    response = sandbox.process.exec(command, timeout=timeout)
    return response.exit_code, response.result


def host_root_of(sandbox: Sandbox) -> int:
    code, out = run(sandbox, "cat /proc/self/uid_map")
    assert code == 0, out
    inside, outside, size = (int(part) for part in out.split()[:3])
    assert (inside, size) == (0, USERNS_SIZE)
    return outside


# -- item 1: the toolbox channel cannot be redirected ----------------------------------------------


def test_the_toolbox_channel_cannot_be_redirected_to_the_engine(
    stack: StackThread, tenant_key: str, attacker: Sandbox
) -> None:
    key = tenant_key
    toolbox = f"{stack.proxy_url}/toolbox/{attacker.id}"
    headers = {"Authorization": f"Bearer {key}"}
    # The sandbox user cannot even touch the channel's folder.
    code, out = run(attacker, "mv /run/tidepool/toolbox.sock /run/tidepool/x")
    assert code != 0 and "Permission denied" in out
    # Its root can: swap the socket for a link to the host's engine socket (<data>/podman.sock, seen from
    # <data>/run/sockets/<id>/), relative as in the report, then absolute.
    engine = stack.data_dir / "podman.sock"
    assert engine.exists()
    for target in ("../../../podman.sock", str(engine)):
        code, out = run(
            attacker,
            "sudo sh -c 'cd /run/tidepool && { [ -S real.sock ] || mv toolbox.sock real.sock; }"
            f" && ln -sfn {target} toolbox.sock && ls -l'",
        )
        assert code == 0, out
        # Engine paths are not toolbox routes; `..` tricks neither.
        for path in (
            "/containers/json",
            "/v4.0.0/libpod/info",
            "/files/../../containers/json",
            "/files/%2e%2e/%2e%2e/containers/json",
        ):
            response = httpx.get(httpx.URL(f"{toolbox}{path}"), headers=headers)
            assert response.status_code == 404, (path, response.text)

        # Toolbox routes over new connections (concurrent calls need more than the pooled one) reach
        # nothing, or the real daemon over a connection verified before the swap; never the engine.
        def slow_call(_: int) -> httpx.Response:
            body = {"command": "sleep 1; echo done"}
            return httpx.post(f"{toolbox}/process/execute", json=body, headers=headers, timeout=30)

        with ThreadPoolExecutor(CONCURRENT_CALLS) as pool:
            answers = list(pool.map(slow_call, range(CONCURRENT_CALLS)))
        statuses = {answer.status_code for answer in answers}
        assert statuses <= {200, 502}, statuses
        assert 502 in statuses  # at least one new connection was attempted, and refused
        for answer in answers:
            assert "ApiVersion" not in answer.text and "Containers" not in answer.text
    # The platform recovers the sandbox's own channel on restart.
    attacker.stop()
    attacker.start()
    assert run(attacker, "echo back")[1].strip() == "back"


# -- item 2: no other host user reaches a toolbox --------------------------------------------------


def test_other_host_users_cannot_reach_any_toolbox(stack: StackThread, attacker: Sandbox) -> None:
    sockets = stack.data_dir / "run" / "sockets"
    assert (sockets.stat().st_uid, sockets.stat().st_mode & 0o777) == (0, 0o700)
    folder = sockets / attacker.id
    assert (folder.stat().st_uid, folder.stat().st_mode & 0o777) == (host_root_of(attacker), 0o700)
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('denied')\n"
        "else:\n print('connected')\n"
    )
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", probe, str(folder / "toolbox.sock")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "denied"


# -- item 3: limits and ids are per sandbox --------------------------------------------------------


def test_each_sandbox_has_a_user_namespace_of_its_own(attacker: Sandbox, neighbour: Sandbox) -> None:
    mine, theirs = host_root_of(attacker), host_root_of(neighbour)
    assert mine >= 268_435_456 and theirs >= 268_435_456  # the `containers` subordinate range
    assert abs(mine - theirs) >= USERNS_SIZE  # disjoint ranges
    # sudo still works: root inside, nobody outside.
    assert run(attacker, "sudo id -u")[1].strip() == "0"


def test_a_process_flood_does_not_stop_other_tenants(tenant: Daytona, neighbour: Sandbox) -> None:
    flooded = tenant.create()
    try:
        # 4,200 sleepers: more than the per-uid process limit (4096) every sandbox used to share.
        _, out = run(
            flooded,
            "n=0; for i in $(seq 4200); do sleep 300 >/dev/null 2>&1 & n=$((n+1)); done; echo spawned $n",
            timeout=120,
        )
        # It runs into its own limit (the pids cgroup), or spawns them all: either way, the others go on.
        assert "spawned 4200" in out or "Resource temporarily unavailable" in out, out
        for _ in range(5):
            assert run(neighbour, "true") == (0, "")
            assert run(neighbour, "for i in $(seq 50); do true & done; wait; echo ok")[1].strip() == "ok"
    finally:
        tenant.delete(flooded)


# -- item 4: the disk size is enforced -------------------------------------------------------------


def test_the_disk_size_is_enforced(stack: StackThread, attacker: Sandbox) -> None:
    size = attacker.disk * GIB
    code, out = run(attacker, "df -B1 --output=size,avail / | tail -1")
    assert code == 0, out
    total, available = (int(part) for part in out.split())
    assert 0.9 * size <= total <= size, (total, size)  # the filesystem's own overhead is all it loses
    host_free_before = os.statvfs(stack.data_dir).f_bavail * os.statvfs(stack.data_dir).f_frsize
    # Reserve all but 64 MiB at once, then write past the end.
    code, out = run(
        attacker,
        f"fallocate -l {available - 64 * 1024**2} /tmp/reserved && "
        "dd if=/dev/urandom of=/tmp/filler bs=1M count=256 2>&1; echo rc=$?",
        timeout=120,
    )
    assert "No space left on device" in out, out
    assert "rc=1" in out, out
    # Far more than the sandbox's size cannot be had either.
    code, out = run(attacker, f"fallocate -l {2 * size} /tmp/huge 2>&1")
    assert code != 0 and "No space left on device" in out, out
    host_free_after = os.statvfs(stack.data_dir).f_bavail * os.statvfs(stack.data_dir).f_frsize
    assert host_free_before - host_free_after < size  # what it wrote is bounded by its own size
    # Space comes back with the files; the sandbox works on.
    code, out = run(attacker, "rm -f /tmp/reserved /tmp/filler && echo freed")
    assert out.strip() == "freed"


def test_the_toolbox_folder_is_a_filesystem_of_its_own(attacker: Sandbox, neighbour: Sandbox) -> None:
    """Sandbox root may write in /run/tidepool (it binds the socket there): filling it fills no one else's."""
    code, out = run(attacker, "sudo dd if=/dev/zero of=/run/tidepool/filler bs=1M count=16 2>&1; echo rc=$?")
    assert "No space left on device" in out and "rc=1" in out, out
    code, out = run(neighbour, "df -B1 --output=avail /run/tidepool | tail -1")
    assert code == 0 and int(out) > 128 * 1024, out  # the neighbour's folder still has its room
    assert run(attacker, "sudo rm -f /run/tidepool/filler && echo ok")[1].strip() == "ok"
    assert run(attacker, "true")[0] == 0


def test_a_deleted_sandbox_leaves_no_disk(stack: StackThread, tenant: Daytona) -> None:
    sandbox = tenant.create()
    image = stack.data_dir / "disks" / f"{sandbox.id}.img"
    assert image.exists()
    assert run(sandbox, "echo data > /home/daytona/file && cat /home/daytona/file")[1].strip() == "data"
    sandbox.stop()
    sandbox.start()
    assert run(sandbox, "cat /home/daytona/file")[1].strip() == "data"  # the disk outlives a restart
    tenant.delete(sandbox)
    assert not image.exists()
    assert not (stack.data_dir / "disks" / sandbox.id).exists()


# -- item 7: root inside is worthless outside ------------------------------------------------------


def test_sandbox_root_holds_no_dangerous_capability(attacker: Sandbox) -> None:
    code, out = run(attacker, "sudo grep -E '^(CapEff|CapBnd|Seccomp):' /proc/self/status")
    assert code == 0, out
    fields = dict(line.split(":\t") for line in out.strip().splitlines())
    for name in ("CapEff", "CapBnd"):
        held = int(fields[name], 16)
        for capability, bit in FORBIDDEN_CAPABILITIES.items():
            assert not held & (1 << bit), f"{name} holds {capability}"
    assert fields["Seccomp"].strip() == "2"  # a seccomp filter is in force
    raw = "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"
    code, out = run(attacker, f'sudo python3 -c "{raw}" 2>&1')
    assert code != 0 and "PermissionError" in out, out
    code, out = run(attacker, "sudo mknod /tmp/disk b 254 0 2>&1")
    assert code != 0, out


# Raw calls through ctypes: the sandbox's python3 (3.11) has no os.unshare. x86-64 syscall numbers.
NAMESPACE_CALLS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, result):
    print(name, 0 if result == 0 else ctypes.get_errno(), flush=True)
call("unshare", libc.unshare(0x10000000))  # CLONE_NEWUSER
pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
if pid == 0:
    os._exit(0)
call("clone", pid if pid < 0 else 0)
call("clone3", libc.syscall(435, 0, 0))
"""
EPERM, ENOSYS = 1, 38


@pytest.mark.parametrize("as_root", [False, True], ids=["user", "sudo"])
def test_sandbox_code_cannot_create_namespaces(attacker: Sandbox, as_root: bool) -> None:
    """A nested user namespace would give sandbox code every capability there (raw sockets, mounts, the
    kernel code behind them): the seccomp profile refuses creating one, as the user and as root."""
    sudo = "sudo " if as_root else ""
    for command in ("unshare -Ur true", "unshare -Urn true", "unshare -Urm mount -t tmpfs x /mnt"):
        code, out = run(attacker, f"{sudo}{command} 2>&1")
        assert code != 0 and "Operation not permitted" in out, (command, out)
    attacker.fs.upload_file(NAMESPACE_CALLS.encode(), "/tmp/namespaces.py")
    code, out = run(attacker, f"{sudo}python3 /tmp/namespaces.py")
    assert code == 0, out
    errors = dict(line.split() for line in out.strip().splitlines())
    # clone3 with ENOSYS: its flags are out of seccomp's reach, libc falls back to clone.
    assert errors == {"unshare": str(EPERM), "clone": str(EPERM), "clone3": str(ENOSYS)}, out
    # Without namespace flags, forks, threads and everyday tools keep working.
    everyday = "import subprocess; subprocess.run(['git', '--version'], check=True)"
    code, out = run(attacker, f'python3 -c "{everyday}" && node -e "console.log(1 + 1)"')
    assert code == 0 and "git version" in out and out.strip().endswith("2"), out


def test_mounts_reveal_no_host_path(stack: StackThread, attacker: Sandbox) -> None:
    code, mountinfo = run(attacker, "cat /proc/self/mountinfo")
    assert code == 0
    for host_path in (str(REPO_ROOT), str(stack.data_dir)):
        assert host_path not in mountinfo
    assert " /opt/tidepool/daemon " in mountinfo and " /run/tidepool " in mountinfo


def test_package_installs_still_work(attacker: Sandbox) -> None:
    code, out = run(
        attacker,
        "sudo apt-get update -qq >/dev/null 2>&1; "
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tree 2>&1"
        " | tail -3; tree --version",
        timeout=300,
    )
    assert code == 0 and "tree v" in out, out
    code, out = run(
        attacker,
        "pip install --quiet --user six==1.16.0 2>&1 && python3 -c 'import six; print(six.__version__)'",
    )
    assert code == 0 and out.strip().endswith("1.16.0"), out


# -- containment: a bomb, a hog and a filler next door ---------------------------------------------


def test_a_noisy_neighbour_is_contained(stack: StackThread, tenant: Daytona, neighbour: Sandbox) -> None:
    """A fork bomb, a memory hog and a disk filler in one sandbox: the neighbour keeps working, the stack
    keeps answering, the host disk keeps its room. (Latency under attack is measured by `make bench`.)"""
    noisy = tenant.create()
    try:
        host_free_before = os.statvfs(stack.data_dir).f_bavail * os.statvfs(stack.data_dir).f_frsize
        session = "noise"
        noisy.process.create_session(session)
        for command in (
            "bomb() { bomb | bomb & }; bomb",
            "python3 -c 'b=[]\nwhile True: b.append(b\"x\" * (64 << 20))'",
            "dd if=/dev/zero of=/tmp/fill bs=4M",
        ):
            noisy.process.execute_session_command(
                session, SessionExecuteRequest(command=f"timeout 60 sh -c {shquote(command)}", run_async=True)
            )
        for _ in range(20):
            assert run(neighbour, "true") == (0, "")
        assert httpx.get(f"{stack.api_url}/health").status_code == 200
        host_free_after = os.statvfs(stack.data_dir).f_bavail * os.statvfs(stack.data_dir).f_frsize
        assert host_free_before - host_free_after < noisy.disk * GIB
    finally:
        tenant.delete(noisy)
    assert run(neighbour, "echo fine")[1].strip() == "fine"


def shquote(command: str) -> str:
    return "'" + command.replace("'", "'\"'\"'") + "'"


def test_host_paths_in_the_data_dir_are_root_only(stack: StackThread) -> None:
    for path in (stack.data_dir / "disks", stack.data_dir / "run" / "sockets"):
        assert Path(path).stat().st_mode & 0o077 == 0, path
