"""The sandbox seccomp profile (issue #7, item 7): the engine's default minus creating namespaces.

The filter's effect inside a real sandbox is tested in tests/integration/test_isolation_sdk.py; here, the
profile's rules are evaluated the way libseccomp does for one syscall (OR of rules, AND of a rule's args),
and the runner's refusal of profiles that would leave sandboxes unfiltered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tidepool_runner.seccomp import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWTIME,
    CLONE_NEWUSER,
    SHIPPED_PROFILE,
    main,
    sandbox_profile,
)
from tidepool_runner.staging import seccomp_profile_text
from tidepool_runtime.settings import Settings

HOST_DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")
SIGCHLD = 17
CLONE_VM_THREAD = 0x3D0F00  # what glibc's pthread_create passes (VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|...)
CLONE_FS, CLONE_FILES = 0x200, 0x400


def verdicts(profile: dict[str, Any], syscall: str, args: list[int], arch: str = "amd64") -> set[str]:
    """The distinct actions of every rule matching the call (the filter's answer must be unambiguous)."""
    found = set()
    for rule in profile["syscalls"]:
        if syscall not in rule.get("names", []):
            continue
        if arch in rule.get("excludes", {}).get("arches", []):
            continue
        if rule.get("includes", {}).get("arches") and arch not in rule["includes"]["arches"]:
            continue
        if rule.get("includes", {}).get("caps") or rule.get("excludes", {}).get("caps"):
            continue  # no such rule for these syscalls
        if all(_matches(arg, args) for arg in rule.get("args") or []):
            found.add(f"{rule['action']}:{rule.get('errnoRet', '')}")
    return found or {f"{profile['defaultAction']}:{profile.get('defaultErrnoRet', '')}"}


def _matches(arg: dict[str, Any], args: list[int]) -> bool:
    value = args[arg["index"]]
    assert arg["op"] == "SCMP_CMP_MASKED_EQ", arg
    return value & arg["value"] == arg["valueTwo"]


ALLOW, EPERM, ENOSYS = {"SCMP_ACT_ALLOW:"}, {"SCMP_ACT_ERRNO:1"}, {"SCMP_ACT_ERRNO:38"}


def test_the_shipped_profile_refuses_new_namespaces_and_allows_the_rest() -> None:
    profile = json.loads(SHIPPED_PROFILE.read_text())
    assert verdicts(profile, "unshare", [CLONE_NEWUSER]) == EPERM
    assert verdicts(profile, "unshare", [CLONE_NEWUSER | CLONE_NEWNET]) == EPERM
    assert verdicts(profile, "unshare", [CLONE_NEWNS]) == EPERM
    assert verdicts(profile, "unshare", [CLONE_NEWTIME]) == EPERM
    assert verdicts(profile, "unshare", [CLONE_FS | CLONE_FILES]) == ALLOW
    assert verdicts(profile, "clone", [CLONE_NEWUSER | SIGCHLD, 0]) == EPERM
    assert verdicts(profile, "clone", [CLONE_NEWNET | SIGCHLD, 0]) == EPERM
    assert verdicts(profile, "clone", [SIGCHLD, 0]) == ALLOW  # fork
    assert verdicts(profile, "clone", [CLONE_VM_THREAD, 0]) == ALLOW  # threads
    # s390's clone takes the stack first, the flags second.
    assert verdicts(profile, "clone", [0, CLONE_NEWUSER | SIGCHLD], arch="s390x") == EPERM
    assert verdicts(profile, "clone", [0, SIGCHLD], arch="s390x") == ALLOW
    assert verdicts(profile, "clone3", [0, 0]) == ENOSYS  # libc then falls back to clone
    # Everything else is the engine's default, untouched.
    assert verdicts(profile, "read", [0, 0, 0]) == ALLOW


@pytest.mark.skipif(not HOST_DEFAULT_PROFILE.is_file(), reason="no containers-common default profile here")
def test_the_engine_default_allows_namespaces_and_the_derived_profile_does_not() -> None:
    base = json.loads(HOST_DEFAULT_PROFILE.read_text())
    assert verdicts(base, "unshare", [CLONE_NEWUSER]) == ALLOW  # what the security tester found
    derived = sandbox_profile(base)
    assert verdicts(derived, "unshare", [CLONE_NEWUSER]) == EPERM
    assert sandbox_profile(derived) == derived  # idempotent
    # Only the three syscalls changed.
    kept = [rule for rule in derived["syscalls"] if not str(rule.get("comment", "")).startswith("Tidepool")]
    names = {name for rule in kept for name in rule["names"]}
    assert not names & {"clone", "clone3", "unshare"}
    base_names = {name for rule in base["syscalls"] for name in rule["names"]}
    assert names | {"clone", "clone3", "unshare"} == base_names


def test_the_shipped_profile_is_what_the_generator_makes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(SHIPPED_PROFILE)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SHIPPED_PROFILE.read_text())


def make_settings(tmp_path: Path, profile: str) -> Settings:
    return Settings(data_dir=tmp_path, sandbox_seccomp_profile=profile)


def test_the_runner_stages_the_shipped_profile_by_default(tmp_path: Path) -> None:
    assert seccomp_profile_text(make_settings(tmp_path, "")) == SHIPPED_PROFILE.read_text()
    own = tmp_path / "own.json"
    own.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    assert seccomp_profile_text(make_settings(tmp_path, str(own))) == own.read_text()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json", "not JSON"),
        ('{"syscalls": []}', "no defaultAction"),
        ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}', "filters nothing"),
    ],
)
def test_the_runner_refuses_a_profile_that_filters_nothing(tmp_path: Path, content: str, reason: str) -> None:
    for unconfined in ("unconfined", "Unconfined "):
        with pytest.raises(ValueError, match="refused"):
            seccomp_profile_text(make_settings(tmp_path, unconfined))
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=reason):
        seccomp_profile_text(make_settings(tmp_path, str(bad)))
    with pytest.raises(FileNotFoundError):
        seccomp_profile_text(make_settings(tmp_path, str(tmp_path / "missing.json")))
