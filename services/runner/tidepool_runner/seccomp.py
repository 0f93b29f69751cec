"""The sandboxes' seccomp profile: the engine's default one, minus creating namespaces (issue #7, item 7).

Why: Podman's default profile (containers-common's seccomp.json) allows `unshare`, `clone` and `clone3`
with any flags, so that containers can nest rootless containers. In a sandbox that made sandbox code the
full-capability root of a user namespace of its own (`unshare -Ur`: CapEff 000001ffffffffff), with raw
sockets, mounts and everything else the kernel gates on a namespace's capabilities: far more kernel than
the sandbox's capability list suggests. Docker's default profile refuses these without CAP_SYS_ADMIN;
this does the same, whatever the sandbox's capabilities:

- `clone` and `unshare` with any namespace flag (CLONE_NEWUSER, NEWNS, NEWPID, NEWNET, NEWIPC, NEWUTS,
  NEWCGROUP; NEWTIME for `unshare`) fail with EPERM; without one they are allowed as before (threads,
  fork, `unshare(CLONE_FS)`);
- `clone3` fails with ENOSYS: its flags sit in a struct that seccomp cannot read, and libc falls back to
  `clone` on ENOSYS, which the filter can inspect.

The result is shipped as `sandbox-seccomp.json` next to this module (the runner's default profile; see
`Settings.sandbox_seccomp_profile`). Regenerate it from the engine's default profile with
`python -m tidepool_runner.seccomp /usr/share/containers/seccomp.json > .../sandbox-seccomp.json`.
The generation is idempotent and works on Docker's default profile too.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

SHIPPED_PROFILE = Path(__file__).with_name("sandbox-seccomp.json")
# Values of TIDEPOOL_SANDBOX_SECCOMP_PROFILE that would turn filtering off: refused (see validate_profile).
UNCONFINED_VALUES = frozenset({"unconfined", "none", "disabled"})

# linux/sched.h
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# clone's low byte is the exit signal (CSIGNAL), so CLONE_NEWTIME only exists for unshare and clone3.
CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)
UNSHARE_NAMESPACE_FLAGS = (*CLONE_NAMESPACE_FLAGS, CLONE_NEWTIME)
EPERM = 1
ENOSYS = 38
# The syscalls this module owns: every rule naming them in the base profile is replaced.
NAMESPACE_SYSCALLS = ("clone", "clone3", "unshare")
# clone(2)'s flags are its first argument, except on s390, where the stack comes first.
_S390_ARCHES = ["s390", "s390x"]


def sandbox_profile(base: dict[str, Any]) -> dict[str, Any]:
    """The sandbox profile derived from `base` (a Docker/containers-common seccomp profile, as parsed JSON).

    Every rule of `base` naming clone, clone3 or unshare loses those names (rules left with none are
    dropped); the conditional rules of this module are appended. Pure and idempotent.
    Raises ValueError when `base` is not a profile (no `defaultAction` or `syscalls` list).
    """
    _check_shape(base)
    profile = copy.deepcopy(base)
    syscalls = []
    for rule in profile["syscalls"]:
        names = [name for name in rule.get("names", []) if name not in NAMESPACE_SYSCALLS]
        if rule.get("name") in NAMESPACE_SYSCALLS or (rule.get("names") and not names):
            continue
        if "names" in rule:
            rule["names"] = names
        syscalls.append(rule)
    profile["syscalls"] = syscalls + namespace_rules()
    return profile


def namespace_rules() -> list[dict[str, Any]]:
    """The rules for clone, clone3 and unshare. They never overlap for one call: either no namespace flag
    is set (allowed) or at least one is (each set flag matches an EPERM rule)."""
    rules: list[dict[str, Any]] = []
    rules += _flag_rules("clone", 0, CLONE_NAMESPACE_FLAGS, {"excludes": {"arches": _S390_ARCHES}})
    rules += _flag_rules("clone", 1, CLONE_NAMESPACE_FLAGS, {"includes": {"arches": _S390_ARCHES}})
    rules += _flag_rules("unshare", 0, UNSHARE_NAMESPACE_FLAGS, {})
    rules.append(
        {
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": ENOSYS,
            "comment": "Tidepool: clone3's flags are out of seccomp's reach; ENOSYS makes libc use clone",
        }
    )
    return rules


def _flag_rules(
    syscall: str, index: int, flags: tuple[int, ...], selector: dict[str, Any]
) -> list[dict[str, Any]]:
    mask = 0
    for flag in flags:
        mask |= flag
    allow = {
        "names": [syscall],
        "action": "SCMP_ACT_ALLOW",
        # MASKED_EQ: (arg & value) == valueTwo.
        "args": [{"index": index, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        "comment": f"Tidepool: {syscall} without namespace flags",
        **copy.deepcopy(selector),
    }
    refuse = [
        {
            "names": [syscall],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": index, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            "comment": f"Tidepool: no new namespaces ({syscall} flag {flag:#x})",
            **copy.deepcopy(selector),
        }
        for flag in flags
    ]
    return [allow, *refuse]


def validate_profile(text: str) -> dict[str, Any]:
    """Parse a profile given to the runner (an operator's own, or the shipped one): a JSON seccomp profile
    that filters something. What it allows is the operator's choice. Raises ValueError with the reason."""
    try:
        profile = json.loads(text)
    except ValueError as error:
        raise ValueError(f"not JSON: {error}") from None
    _check_shape(profile)
    if profile["defaultAction"] == "SCMP_ACT_ALLOW":
        raise ValueError("defaultAction SCMP_ACT_ALLOW filters nothing")
    return profile


def _check_shape(profile: Any) -> None:
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ValueError("not a seccomp profile: no defaultAction")
    if not isinstance(profile.get("syscalls"), list):
        raise ValueError("not a seccomp profile: no syscalls list")


def main(argv: list[str]) -> int:
    """`python -m tidepool_runner.seccomp BASE.json`: print the sandbox profile derived from BASE."""
    if len(argv) != 1:
        print("usage: python -m tidepool_runner.seccomp BASE_PROFILE.json", file=sys.stderr)
        return 2
    base = json.loads(Path(argv[0]).read_text())
    print(json.dumps(sandbox_profile(base), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
