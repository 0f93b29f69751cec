"""`/git/...`: repository operations through the `git` CLI, with the SDK's error codes.

Every git process runs with GIT_TERMINAL_PROMPT=0 (and ssh in batch mode), so a missing credential fails
fast instead of waiting for a prompt. Credentials given in a request (`username`/`password` on clone, push
and pull) reach git only through a one-shot credential helper that reads them from that git process's
environment: they never appear in argv, the remote URL or any config file. `POST /git/credentials`
(`dangerously_authenticate`) is the one explicit exception: it stores them with git's `store` helper.

Failures map to the codes the SDK turns into typed exceptions (`GIT_AUTH_FAILED` 401,
`GIT_REPO_NOT_FOUND` 404, `GIT_BRANCH_EXISTS` 409, ...; see spec §1.6). Relative paths resolve against
the work dir.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

from .context import DaemonContext
from .errors import DaemonError, bad_request
from .http_io import Request, Response, empty_response, json_response
from .spawn_env import build_environment

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
RESET_MODES = ("soft", "mixed", "hard", "merge", "keep")
CONFIG_SCOPES = ("global", "local", "system")

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


class GitService:
    def __init__(self, context: DaemonContext) -> None:
        self._context = context

    # -- plumbing ---------------------------------------------------------------------------------

    def _env(self, credentials: Credentials | None = None) -> dict[str, str]:
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

    def _git(
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
                env=self._env(credentials),
                input=stdin.encode("utf-8") if stdin is not None else None,
                stdin=subprocess.DEVNULL if stdin is None else None,
                capture_output=True,
                check=False,
            )
        except FileNotFoundError:
            raise DaemonError(500, "git is not installed in this sandbox", GIT_COMMAND_FAILED) from None
        except OSError as exc:
            raise DaemonError(500, f"failed to run git: {exc}", GIT_COMMAND_FAILED) from None
        return GitResult(
            completed.returncode,
            completed.stdout.decode("utf-8", "replace"),
            completed.stderr.decode("utf-8", "replace"),
        )

    def _repo(self, raw_path: object) -> str:
        """The resolved path of an existing repository (or a directory inside one)."""
        path = self._path(raw_path)
        if not os.path.isdir(path):
            raise DaemonError(404, f"repository not found: {raw_path}", GIT_REPO_NOT_FOUND)
        result = self._git(["rev-parse", "--git-dir"], path)
        if result.returncode != 0:
            raise DaemonError(404, f"not a git repository: {raw_path}", GIT_REPO_NOT_FOUND)
        return path

    def _path(self, raw_path: object) -> str:
        if not isinstance(raw_path, str) or not raw_path:
            raise bad_request("path is required")
        return self._context.resolve_path(raw_path)

    # -- endpoints --------------------------------------------------------------------------------

    def clone(self, request: Request) -> Response:
        payload = request.json_object_body()
        url = _required_string(payload, "url")
        destination = self._path(payload.get("path"))
        branch = _optional_string(payload, "branch")
        commit_id = _optional_string(payload, "commit_id")
        depth = payload.get("depth")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
            raise bad_request("depth must be a non-negative integer")
        credentials = _credentials(payload)

        args = ["clone", "--quiet"]
        if branch:
            args += ["--branch", branch]
        if depth:
            args += ["--depth", str(depth), "--no-single-branch"]
        args += ["--", url, destination]
        config = ["http.sslVerify=false"] if payload.get("insecure_skip_tls") is True else []
        result = self._git(args, credentials=credentials, config=config)
        if result.returncode != 0:
            raise _clone_error(result, url, branch)
        if commit_id:
            checkout = self._git(["checkout", "--quiet", "--detach", commit_id], destination)
            if checkout.returncode != 0:
                raise DaemonError(
                    404, f"commit not found: {commit_id}: {checkout.message}", GIT_BRANCH_NOT_FOUND
                )
        return json_response(200, {})

    def status(self, request: Request) -> Response:
        path = self._repo(request.require_query("path"))
        result = self._git(["status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all"], path)
        if result.returncode != 0:
            raise _generic_error(result)
        return json_response(200, parse_status(result.stdout))

    def list_branches(self, request: Request) -> Response:
        path = self._repo(request.require_query("path"))
        result = self._git(["for-each-ref", "--format=%(refname:short)", "refs/heads/"], path)
        if result.returncode != 0:
            raise _generic_error(result)
        branches = [line for line in result.stdout.splitlines() if line]
        payload: dict[str, Any] = {"branches": branches}
        current = self._git(["symbolic-ref", "--quiet", "--short", "HEAD"], path)
        if current.returncode == 0 and current.stdout.strip():
            payload["current"] = current.stdout.strip()
        return json_response(200, payload)

    def create_branch(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        name = _required_string(payload, "name")
        # Like upstream: the new branch is created from HEAD and checked out.
        result = self._git(["checkout", "--quiet", "-b", name], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "already exists" in lowered:
                raise DaemonError(409, f"branch already exists: {name}", GIT_BRANCH_EXISTS)
            if "not a valid branch name" in lowered:
                raise bad_request(f"invalid branch name: {name}")
            raise _generic_error(result)
        return empty_response(201)

    def delete_branch(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        name = _required_string(payload, "name")
        result = self._git(["branch", "-D", "--", name], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "not found" in lowered:
                raise DaemonError(404, f"branch not found: {name}", GIT_BRANCH_NOT_FOUND)
            if "checked out" in lowered or "cannot delete" in lowered:
                raise DaemonError(
                    409, f"cannot delete the checked-out branch {name}", "GIT_BRANCH_CHECKED_OUT"
                )
            raise _generic_error(result)
        return empty_response(204)

    def checkout(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        branch = _required_string(payload, "branch")
        result = self._git(["checkout", "--quiet", branch, "--"], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "would be overwritten" in lowered or "commit your changes or stash" in lowered:
                raise DaemonError(
                    409, f"local changes block the checkout: {result.message}", GIT_DIRTY_WORKTREE
                )
            if "did not match" in lowered or "invalid reference" in lowered or "unknown revision" in lowered:
                raise DaemonError(404, f"branch not found: {branch}", GIT_BRANCH_NOT_FOUND)
            raise _generic_error(result)
        return json_response(200, {})

    def add(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        files = _string_list(payload.get("files"), "files")
        if not files:
            raise bad_request('files must list at least one path (use "." for all)')
        result = self._git(["add", "--", *files], path)
        if result.returncode != 0:
            if "did not match any files" in result.message:
                raise bad_request(result.message)
            raise _generic_error(result)
        return json_response(200, {})

    def commit(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        message = _required_string(payload, "message", allow_empty=True)
        author = _required_string(payload, "author")
        email = _required_string(payload, "email")
        args = ["commit", "--quiet", "--no-verify", "-m", message]
        if payload.get("allow_empty") is True:
            args.append("--allow-empty")
        if message == "":
            args.append("--allow-empty-message")
        identity = [f"user.name={author}", f"user.email={email}"]
        result = self._git(args, path, config=identity)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "nothing to commit" in lowered or "no changes added to commit" in lowered:
                raise DaemonError(
                    409, "nothing to commit (stage changes first or allow_empty)", "GIT_NOTHING_TO_COMMIT"
                )
            if "unmerged" in lowered or "conflict" in lowered:
                raise DaemonError(409, result.message, GIT_MERGE_CONFLICT)
            raise _generic_error(result)
        head = self._git(["rev-parse", "HEAD"], path)
        if head.returncode != 0:
            raise _generic_error(head)
        return json_response(200, {"hash": head.stdout.strip()})

    def push(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        remote = _optional_string(payload, "remote") or "origin"
        branch = _optional_string(payload, "branch")
        args = ["push", "--porcelain"]
        if payload.get("set_upstream") is True:
            args.append("--set-upstream")
        args += [remote, branch or "HEAD"]
        result = self._git(args, path, credentials=_credentials(payload))
        if result.returncode != 0:
            raise _push_error(result)
        return json_response(200, {})

    def pull(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        remote = _optional_string(payload, "remote")
        branch = _optional_string(payload, "branch")
        args = ["pull", "--no-rebase", "--no-edit", "--quiet"]
        if branch or remote:
            args += [remote or "origin"]
            if branch:
                args.append(branch)
        elif not self._has_upstream(path):
            current = self._git(["symbolic-ref", "--quiet", "--short", "HEAD"], path).stdout.strip()
            args += ["origin"] + ([current] if current else [])
        result = self._git(args, path, credentials=_credentials(payload))
        if result.returncode != 0:
            raise _pull_error(result, branch)
        return json_response(200, {})

    def history(self, request: Request) -> Response:
        path = self._repo(request.require_query("path"))
        result = self._git(["log", "--format=%H%x00%an%x00%ae%x00%aI%x00%B%x1e"], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "does not have any commits" in lowered or "bad default revision" in lowered:
                return json_response(200, [])
            raise _generic_error(result)
        commits = []
        for record in result.stdout.split("\x1e"):
            record = record.strip("\n")
            if not record:
                continue
            fields = record.split("\x00")
            if len(fields) < 5:
                continue
            commit_hash, author, email, timestamp, message = fields[:5]
            commits.append(
                {
                    "hash": commit_hash,
                    "author": author,
                    "email": email,
                    "message": message.strip(),
                    "timestamp": timestamp,
                }
            )
        return json_response(200, commits)

    def init(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._path(payload.get("path"))
        args = ["init", "--quiet"]
        if payload.get("bare") is True:
            args.append("--bare")
        initial_branch = _optional_string(payload, "initial_branch")
        if initial_branch:
            args.append(f"--initial-branch={initial_branch}")
        args += ["--", path]
        result = self._git(args)
        if result.returncode != 0:
            raise _generic_error(result)
        return empty_response(201)

    def reset(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        mode = _optional_string(payload, "mode")
        target = _optional_string(payload, "target")
        files = _string_list(payload.get("files"), "files") if payload.get("files") is not None else []
        if mode is not None and mode not in RESET_MODES:
            raise bad_request(f"mode must be one of {', '.join(RESET_MODES)}")
        args = ["reset", "--quiet"]
        if files:
            if mode not in (None, "mixed"):
                raise bad_request("a reset limited to files supports only the mixed mode")
            args += [target or "HEAD", "--", *files]
        else:
            if mode:
                args.append(f"--{mode}")
            if target:
                args.append(target)
        result = self._git(args, path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "unknown revision" in lowered or "ambiguous argument" in lowered:
                raise DaemonError(404, f"revision not found: {target}", GIT_BRANCH_NOT_FOUND)
            raise _generic_error(result)
        return json_response(200, {})

    def restore(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        files = _string_list(payload.get("files"), "files")
        if not files:
            raise bad_request("files must list at least one path")
        args = ["restore"]
        if payload.get("staged") is True:
            args.append("--staged")
        if payload.get("worktree") is True:
            args.append("--worktree")
        source = _optional_string(payload, "source")
        if source:
            args.append(f"--source={source}")
        result = self._git([*args, "--", *files], path)
        if result.returncode != 0:
            if "did not match any file" in result.message:
                raise bad_request(result.message)
            raise _generic_error(result)
        return json_response(200, {})

    def add_remote(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._repo(payload.get("path"))
        name = _required_string(payload, "name")
        url = _required_string(payload, "url")
        result = self._git(["remote", "add", "--", name, url], path)
        if result.returncode != 0:
            if "already exists" not in result.message:
                raise _generic_error(result)
            if payload.get("overwrite") is not True:
                raise DaemonError(409, f"remote already exists: {name}", "GIT_REMOTE_EXISTS")
            result = self._git(["remote", "set-url", "--", name, url], path)
            if result.returncode != 0:
                raise _generic_error(result)
        if payload.get("fetch") is True:
            fetched = self._git(["fetch", "--quiet", name], path)
            if fetched.returncode != 0:
                raise _network_error(fetched)
        return empty_response(201)

    def list_remotes(self, request: Request) -> Response:
        path = self._repo(request.require_query("path"))
        result = self._git(["config", "--local", "-z", "--get-regexp", r"^remote\..*\.url$"], path)
        remotes = []
        if result.returncode == 0:
            for entry in result.stdout.split("\x00"):
                if not entry:
                    continue
                key, _, value = entry.partition("\n")
                name = key[len("remote.") : -len(".url")]
                remotes.append({"name": name, "url": value})
        elif result.returncode != 1:  # 1 means "no such key": no remotes
            raise _generic_error(result)
        return json_response(200, {"remotes": remotes})

    def set_config(self, request: Request) -> Response:
        payload = request.json_object_body()
        key = _required_string(payload, "key")
        value = _required_string(payload, "value", allow_empty=True)
        scope, cwd = self._config_scope(payload.get("scope"), payload.get("path"))
        result = self._git(["config", f"--{scope}", "--", key, value], cwd)
        if result.returncode != 0:
            raise _config_error(result)
        return json_response(200, {})

    def get_config(self, request: Request) -> Response:
        key = request.require_query("key")
        scope, cwd = self._config_scope(request.query_value("scope"), request.query_value("path"))
        result = self._git(["config", f"--{scope}", "--get", "--", key], cwd)
        if result.returncode == 1:
            return json_response(200, {})
        if result.returncode != 0:
            raise _config_error(result)
        return json_response(200, {"value": result.stdout.rstrip("\n")})

    def configure_user(self, request: Request) -> Response:
        payload = request.json_object_body()
        name = _required_string(payload, "name")
        email = _required_string(payload, "email")
        scope, cwd = self._config_scope(payload.get("scope"), payload.get("path"))
        for key, value in (("user.name", name), ("user.email", email)):
            result = self._git(["config", f"--{scope}", key, value], cwd)
            if result.returncode != 0:
                raise _config_error(result)
        return json_response(200, {})

    def authenticate(self, request: Request) -> Response:
        payload = request.json_object_body()
        username = _required_string(payload, "username")
        password = _required_string(payload, "password")
        host = _optional_string(payload, "host") or "github.com"
        protocol = _optional_string(payload, "protocol") or "https"
        if any(char in value for value in (username, password, host, protocol) for char in "\n\x00"):
            raise bad_request("credentials must not contain newlines or NUL bytes")
        helper = self._git(["config", "--global", "credential.helper"])
        if helper.returncode != 0 or not helper.stdout.strip():
            configured = self._git(["config", "--global", "credential.helper", "store"])
            if configured.returncode != 0:
                raise _config_error(configured)
        description = f"protocol={protocol}\nhost={host}\nusername={username}\npassword={password}\n\n"
        result = self._git(["credential", "approve"], stdin=description)
        if result.returncode != 0:
            raise _generic_error(result)
        return json_response(200, {})

    # -- helpers ----------------------------------------------------------------------------------

    def _has_upstream(self, path: str) -> bool:
        result = self._git(["rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}"], path)
        return result.returncode == 0

    def _config_scope(self, raw_scope: object, raw_path: object) -> tuple[str, str | None]:
        scope = raw_scope if isinstance(raw_scope, str) and raw_scope else "global"
        if scope not in CONFIG_SCOPES:
            raise bad_request(f"scope must be one of {', '.join(CONFIG_SCOPES)}")
        if scope == "local":
            if not raw_path:
                raise bad_request("path is required for the local scope")
            return scope, self._repo(raw_path)
        if isinstance(raw_path, str) and raw_path:
            path = self._path(raw_path)
            return scope, path if os.path.isdir(path) else None
        return scope, None


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


def _required_string(payload: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or (not allow_empty and not value):
        raise bad_request(f"{name} is required")
    if "\x00" in value:
        raise bad_request(f"{name} must not contain NUL bytes")
    return value


def _optional_string(payload: dict[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise bad_request(f"{name} must be a string")
    return value


def _string_list(raw: object, name: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) and "\x00" not in item for item in raw):
        raise bad_request(f"{name} must be a list of strings")
    return list(raw)


def _credentials(payload: dict[str, Any]) -> Credentials | None:
    username = _optional_string(payload, "username")
    password = _optional_string(payload, "password")
    if username is None and password is None:
        return None
    return Credentials(username, password)


def _classify_network_failure(message: str) -> tuple[int, str] | None:
    lowered = message.lower()
    if any(marker in lowered for marker in _AUTH_MARKERS):
        return 401, GIT_AUTH_FAILED
    if any(marker in lowered for marker in _NOT_FOUND_MARKERS):
        return 404, GIT_REPO_NOT_FOUND
    if any(marker in lowered for marker in _TRANSPORT_MARKERS):
        return 502, GIT_TRANSPORT_FAILED
    return None


def _network_error(result: GitResult) -> DaemonError:
    classified = _classify_network_failure(result.message)
    if classified is None:
        return _generic_error(result)
    status, code = classified
    return DaemonError(status, _describe(code, result.message), code)


def _describe(code: str, detail: str) -> str:
    prefix = {
        GIT_AUTH_FAILED: "authentication failed",
        GIT_REPO_NOT_FOUND: "repository not found",
        GIT_TRANSPORT_FAILED: "could not reach the remote",
    }.get(code, "git failed")
    return f"{prefix}: {detail}"


def _clone_error(result: GitResult, url: str, branch: str | None) -> DaemonError:
    lowered = result.message.lower()
    if branch and ("remote branch" in lowered and "not found" in lowered):
        return DaemonError(404, f"branch not found: {branch}", GIT_BRANCH_NOT_FOUND)
    if "already exists and is not an empty directory" in lowered:
        return DaemonError(409, result.message, "GIT_DESTINATION_EXISTS")
    return _network_error(result)


def _push_error(result: GitResult) -> DaemonError:
    message = result.message + "\n" + result.stdout
    lowered = message.lower()
    if "[remote rejected]" in lowered or "remote rejected" in lowered:
        return DaemonError(422, f"the remote rejected the push: {result.message}", GIT_REMOTE_REJECTED)
    if "[rejected]" in lowered or "non-fast-forward" in lowered or "fetch first" in lowered:
        return DaemonError(409, f"push rejected: {result.message}", GIT_PUSH_REJECTED)
    if "src refspec" in lowered and "does not match any" in lowered:
        return DaemonError(404, f"branch not found: {result.message}", GIT_BRANCH_NOT_FOUND)
    return _network_error(result)


def _pull_error(result: GitResult, branch: str | None) -> DaemonError:
    lowered = result.message.lower() + "\n" + result.stdout.lower()
    if "conflict" in lowered or "automatic merge failed" in lowered:
        return DaemonError(409, f"merge conflict: {result.message or result.stdout}", GIT_MERGE_CONFLICT)
    if "would be overwritten" in lowered or "commit your changes or stash" in lowered:
        return DaemonError(409, f"local changes block the pull: {result.message}", GIT_DIRTY_WORKTREE)
    if "couldn't find remote ref" in lowered:
        return DaemonError(404, f"branch not found: {branch or result.message}", GIT_BRANCH_NOT_FOUND)
    return _network_error(result)


def _config_error(result: GitResult) -> DaemonError:
    lowered = result.message.lower()
    if "permission denied" in lowered:
        return DaemonError(403, result.message, "GIT_CONFIG_ACCESS_DENIED")
    if "invalid key" in lowered or "key does not contain a section" in lowered:
        return bad_request(result.message)
    return _generic_error(result)


def _generic_error(result: GitResult) -> DaemonError:
    lowered = result.message.lower()
    if "not a git repository" in lowered:
        return DaemonError(404, result.message, GIT_REPO_NOT_FOUND)
    return DaemonError(400, result.message, GIT_COMMAND_FAILED)
