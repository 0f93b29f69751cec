"""The git command layer: runs the `git` CLI for the `/git/...` routes (`service.py`) and maps its failures
to the SDK's error codes.

Every git process runs with GIT_TERMINAL_PROMPT=0 (and ssh in batch mode), so a missing credential fails
fast instead of waiting for a prompt. Credentials given in a request reach git only through a one-shot
credential helper that reads them from that git process's environment: they never appear in argv, the
remote URL or any config file.

Failures map to the codes the SDK turns into typed exceptions (`GIT_AUTH_FAILED` 401,
`GIT_REPO_NOT_FOUND` 404, `GIT_BRANCH_EXISTS` 409, ...; see spec §1.6).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

from ..context import DaemonContext
from ..errors import DaemonError, bad_request
from ..process.spawn_env import build_environment

GIT_AUTH_FAILED = "GIT_AUTH_FAILED"
GIT_REPO_NOT_FOUND = "GIT_REPO_NOT_FOUND"
GIT_BRANCH_NOT_FOUND = "GIT_BRANCH_NOT_FOUND"
GIT_BRANCH_EXISTS = "GIT_BRANCH_EXISTS"
GIT_PUSH_REJECTED = "GIT_PUSH_REJECTED"
GIT_DIRTY_WORKTREE = "GIT_DIRTY_WORKTREE"
GIT_MERGE_CONFLICT = "GIT_MERGE_CONFLICT"
GIT_TRANSPORT_FAILED = "GIT_TRANSPORT_FAILED"
GIT_REMOTE_REJECTED = "GIT_REMOTE_REJECTED"
GIT_COMMAND_FAILED = "GIT_COMMAND_FAILED"

# The helper prints the request's credentials for `get` and ignores `store`/`erase`, so nothing persists.
ONE_SHOT_CREDENTIAL_HELPER = (
    '!f() { test "$1" = get || return 0; '
    'test -n "$TIDEPOOL_GIT_USERNAME" && printf \'username=%s\\n\' "$TIDEPOOL_GIT_USERNAME"; '
    'test -n "$TIDEPOOL_GIT_PASSWORD" && printf \'password=%s\\n\' "$TIDEPOOL_GIT_PASSWORD"; }; f'
)

# porcelain v2 status letters -> the SDK's `Status` enum values.
_STATUS_BY_LETTER = {
    ".": "Unmodified",
    "M": "Modified",
    "T": "Modified",
    "A": "Added",
    "D": "Deleted",
    "R": "Renamed",
    "C": "Copied",
    "U": "Updated but unmerged",
}

_AUTH_MARKERS = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "terminal prompts disabled",
    "invalid username or password",
    "http basic: access denied",
    "the requested url returned error: 401",
    "the requested url returned error: 403",
    "permission denied (publickey",
    "host key verification failed",
)
_NOT_FOUND_MARKERS = (
    "repository not found",
    "does not appear to be a git repository",
    "not a git repository",
    "access denied or repository not exported",
    "the requested url returned error: 404",
    "' not found",
    "' does not exist",
    "no such repository",
)
_TRANSPORT_MARKERS = (
    "could not resolve host",
    "connection refused",
    "failed to connect",
    "connection timed out",
    "timed out",
    "network is unreachable",
    "no route to host",
    "ssl certificate problem",
    "server certificate verification failed",
    "unable to access",
    "unable to connect",
    "could not read from remote repository",
    "the remote end hung up unexpectedly",
    "rpc failed",
    "early eof",
)


@dataclass(frozen=True)
class GitResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        text = (self.stderr.strip() or self.stdout.strip()) or f"git exited with code {self.returncode}"
        return text


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None


class GitCommands:
    """Runs git for one daemon: in the work dir by default, with the sandbox's environment."""

    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    def env(self, credentials: Credentials | None = None) -> dict[str, str]:
        env = build_environment(self._context)
        env["GIT_TERMINAL_PROMPT"] = "0"
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        env["LC_ALL"] = "C"  # stable messages to classify errors
        env.pop("GIT_ASKPASS", None)
        env.pop("SSH_ASKPASS", None)
        if credentials is not None:
            env["TIDEPOOL_GIT_USERNAME"] = credentials.username or ""
            env["TIDEPOOL_GIT_PASSWORD"] = credentials.password or ""
        return env

    def run(
        self,
        args: list[str],
        cwd: str | None = None,
        *,
        credentials: Credentials | None = None,
        config: list[str] | None = None,
        stdin: str | None = None,
    ) -> GitResult:
        command = ["git"]
        if credentials is not None:
            # An empty helper first resets any configured helpers (e.g. a stored credential).
            command += ["-c", "credential.helper=", "-c", f"credential.helper={ONE_SHOT_CREDENTIAL_HELPER}"]
        for item in config or []:
            command += ["-c", item]
        command += args
        try:
            completed = subprocess.run(
                command,
                cwd=cwd or self._context.work_dir,
                env=self.env(credentials),
                input=stdin.encode("utf-8") if stdin is not None else None,
                stdin=subprocess.DEVNULL if stdin is None else None,
                capture_output=True,
                check=False,
            )
        except FileNotFoundError:
            # The image's limit, not a server error: 400 (the SDK's DaytonaBadRequestError) naming it.
            raise DaemonError(
                400, "git is not installed in this sandbox's image (no git on its PATH)", GIT_COMMAND_FAILED
            ) from None
        except OSError as exc:
            raise DaemonError(500, f"failed to run git: {exc}", GIT_COMMAND_FAILED) from None
        return GitResult(
            completed.returncode,
            completed.stdout.decode("utf-8", "replace"),
            completed.stderr.decode("utf-8", "replace"),
        )

    def repository(self, raw_path: object) -> str:
        """The resolved path of an existing repository (or a directory inside one)."""
        path = self.resolve(raw_path)
        if not os.path.isdir(path):
            raise DaemonError(404, f"repository not found: {raw_path}", GIT_REPO_NOT_FOUND)
        result = self.run(["rev-parse", "--git-dir"], path)
        if result.returncode != 0:
            raise DaemonError(404, f"not a git repository: {raw_path}", GIT_REPO_NOT_FOUND)
        return path

    def resolve(self, raw_path: object) -> str:
        if not isinstance(raw_path, str) or not raw_path:
            raise bad_request("path is required")
        return self._context.resolve_path(raw_path)

    def has_upstream(self, path: str) -> bool:
        result = self.run(["rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}"], path)
        return result.returncode == 0


def parse_status(porcelain: str) -> dict[str, Any]:
    """Turn `git status --porcelain=v2 --branch -z` output into the SDK's GitStatus."""
    status: dict[str, Any] = {"currentBranch": "", "fileStatus": [], "branchPublished": False}
    fields = porcelain.split("\x00")
    index = 0
    while index < len(fields):
        entry = fields[index]
        index += 1
        if not entry:
            continue
        if entry.startswith("# "):
            _parse_branch_header(entry[2:], status)
            continue
        kind = entry[0]
        if kind == "?":
            status["fileStatus"].append(_file_status(entry[2:], "Untracked", "Untracked"))
        elif kind == "1":
            parts = entry.split(" ", 8)
            status["fileStatus"].append(_file_status(parts[8], *_letters(parts[1])))
        elif kind == "2":
            parts = entry.split(" ", 9)
            original = fields[index] if index < len(fields) else ""
            index += 1
            status["fileStatus"].append(_file_status(parts[9], *_letters(parts[1]), extra=original))
        elif kind == "u":
            parts = entry.split(" ", 10)
            status["fileStatus"].append(
                _file_status(parts[10], "Updated but unmerged", "Updated but unmerged")
            )
    return status


def _parse_branch_header(header: str, status: dict[str, Any]) -> None:
    name, _, value = header.partition(" ")
    if name == "branch.head":
        if value == "(detached)":
            status["currentBranch"] = "HEAD"
            status["detached"] = True
        else:
            status["currentBranch"] = value
            status["detached"] = False
    elif name == "branch.upstream":
        status["upstream"] = value
    elif name == "branch.ab":
        ahead, _, behind = value.partition(" ")
        status["ahead"] = abs(int(ahead))
        status["behind"] = abs(int(behind))
        status["branchPublished"] = True  # only reported when the upstream branch exists


def _letters(xy: str) -> tuple[str, str]:
    staging = _STATUS_BY_LETTER.get(xy[0], "Modified") if xy else "Unmodified"
    worktree = _STATUS_BY_LETTER.get(xy[1], "Modified") if len(xy) > 1 else "Unmodified"
    return staging, worktree


def _file_status(name: str, staging: str, worktree: str, extra: str = "") -> dict[str, str]:
    return {"name": name, "staging": staging, "worktree": worktree, "extra": extra}


def _classify_network_failure(message: str) -> tuple[int, str] | None:
    lowered = message.lower()
    if any(marker in lowered for marker in _AUTH_MARKERS):
        return 401, GIT_AUTH_FAILED
    if any(marker in lowered for marker in _NOT_FOUND_MARKERS):
        return 404, GIT_REPO_NOT_FOUND
    if any(marker in lowered for marker in _TRANSPORT_MARKERS):
        return 502, GIT_TRANSPORT_FAILED
    return None


def network_error(result: GitResult) -> DaemonError:
    classified = _classify_network_failure(result.message)
    if classified is None:
        return generic_error(result)
    status, code = classified
    return DaemonError(status, _describe(code, result.message), code)


def _describe(code: str, detail: str) -> str:
    prefix = {
        GIT_AUTH_FAILED: "authentication failed",
        GIT_REPO_NOT_FOUND: "repository not found",
        GIT_TRANSPORT_FAILED: "could not reach the remote",
    }.get(code, "git failed")
    return f"{prefix}: {detail}"


def clone_error(result: GitResult, url: str, branch: str | None) -> DaemonError:
    lowered = result.message.lower()
    if branch and ("remote branch" in lowered and "not found" in lowered):
        return DaemonError(404, f"branch not found: {branch}", GIT_BRANCH_NOT_FOUND)
    if "already exists and is not an empty directory" in lowered:
        return DaemonError(409, result.message, "GIT_DESTINATION_EXISTS")
    return network_error(result)


def push_error(result: GitResult) -> DaemonError:
    message = result.message + "\n" + result.stdout
    lowered = message.lower()
    if "[remote rejected]" in lowered or "remote rejected" in lowered:
        return DaemonError(422, f"the remote rejected the push: {result.message}", GIT_REMOTE_REJECTED)
    if "[rejected]" in lowered or "non-fast-forward" in lowered or "fetch first" in lowered:
        return DaemonError(409, f"push rejected: {result.message}", GIT_PUSH_REJECTED)
    if "src refspec" in lowered and "does not match any" in lowered:
        return DaemonError(404, f"branch not found: {result.message}", GIT_BRANCH_NOT_FOUND)
    return network_error(result)


def pull_error(result: GitResult, branch: str | None) -> DaemonError:
    lowered = result.message.lower() + "\n" + result.stdout.lower()
    if "conflict" in lowered or "automatic merge failed" in lowered:
        return DaemonError(409, f"merge conflict: {result.message or result.stdout}", GIT_MERGE_CONFLICT)
    if "would be overwritten" in lowered or "commit your changes or stash" in lowered:
        return DaemonError(409, f"local changes block the pull: {result.message}", GIT_DIRTY_WORKTREE)
    if "couldn't find remote ref" in lowered:
        return DaemonError(404, f"branch not found: {branch or result.message}", GIT_BRANCH_NOT_FOUND)
    return network_error(result)


def config_error(result: GitResult) -> DaemonError:
    lowered = result.message.lower()
    if "permission denied" in lowered:
        return DaemonError(403, result.message, "GIT_CONFIG_ACCESS_DENIED")
    if "invalid key" in lowered or "key does not contain a section" in lowered:
        return bad_request(result.message)
    return generic_error(result)


def generic_error(result: GitResult) -> DaemonError:
    lowered = result.message.lower()
    if "not a git repository" in lowered:
        return DaemonError(404, result.message, GIT_REPO_NOT_FOUND)
    return DaemonError(400, result.message, GIT_COMMAND_FAILED)
