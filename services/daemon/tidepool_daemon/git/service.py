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
from typing import Any

from ..context import DaemonContext
from ..errors import DaemonError, bad_request
from ..httpd.http_io import Request, Response, empty_response, json_response
from .commands import (
    GIT_BRANCH_EXISTS,
    GIT_BRANCH_NOT_FOUND,
    GIT_DIRTY_WORKTREE,
    GIT_MERGE_CONFLICT,
    Credentials,
    GitCommands,
    clone_error,
    config_error,
    generic_error,
    network_error,
    parse_status,
    pull_error,
    push_error,
)

RESET_MODES = ("soft", "mixed", "hard", "merge", "keep")
CONFIG_SCOPES = ("global", "local", "system")


class GitService:
    def __init__(self, context: DaemonContext) -> None:
        self._commands = GitCommands(context)

    # -- endpoints --------------------------------------------------------------------------------

    def clone(self, request: Request) -> Response:
        payload = request.json_object_body()
        url = _required_string(payload, "url")
        destination = self._commands.resolve(payload.get("path"))
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
        result = self._commands.run(args, credentials=credentials, config=config)
        if result.returncode != 0:
            raise clone_error(result, url, branch)
        if commit_id:
            checkout = self._commands.run(["checkout", "--quiet", "--detach", commit_id], destination)
            if checkout.returncode != 0:
                raise DaemonError(
                    404, f"commit not found: {commit_id}: {checkout.message}", GIT_BRANCH_NOT_FOUND
                )
        return json_response(200, {})

    def status(self, request: Request) -> Response:
        path = self._commands.repository(request.require_query("path"))
        result = self._commands.run(
            ["status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all"], path
        )
        if result.returncode != 0:
            raise generic_error(result)
        return json_response(200, parse_status(result.stdout))

    def list_branches(self, request: Request) -> Response:
        path = self._commands.repository(request.require_query("path"))
        result = self._commands.run(["for-each-ref", "--format=%(refname:short)", "refs/heads/"], path)
        if result.returncode != 0:
            raise generic_error(result)
        branches = [line for line in result.stdout.splitlines() if line]
        payload: dict[str, Any] = {"branches": branches}
        current = self._commands.run(["symbolic-ref", "--quiet", "--short", "HEAD"], path)
        if current.returncode == 0 and current.stdout.strip():
            payload["current"] = current.stdout.strip()
        return json_response(200, payload)

    def create_branch(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        name = _required_string(payload, "name")
        # Like upstream: the new branch is created from HEAD and checked out.
        result = self._commands.run(["checkout", "--quiet", "-b", name], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "already exists" in lowered:
                raise DaemonError(409, f"branch already exists: {name}", GIT_BRANCH_EXISTS)
            if "not a valid branch name" in lowered:
                raise bad_request(f"invalid branch name: {name}")
            raise generic_error(result)
        return empty_response(201)

    def delete_branch(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        name = _required_string(payload, "name")
        result = self._commands.run(["branch", "-D", "--", name], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "not found" in lowered:
                raise DaemonError(404, f"branch not found: {name}", GIT_BRANCH_NOT_FOUND)
            if "checked out" in lowered or "cannot delete" in lowered:
                raise DaemonError(
                    409, f"cannot delete the checked-out branch {name}", "GIT_BRANCH_CHECKED_OUT"
                )
            raise generic_error(result)
        return empty_response(204)

    def checkout(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        branch = _required_string(payload, "branch")
        result = self._commands.run(["checkout", "--quiet", branch, "--"], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "would be overwritten" in lowered or "commit your changes or stash" in lowered:
                raise DaemonError(
                    409, f"local changes block the checkout: {result.message}", GIT_DIRTY_WORKTREE
                )
            if "did not match" in lowered or "invalid reference" in lowered or "unknown revision" in lowered:
                raise DaemonError(404, f"branch not found: {branch}", GIT_BRANCH_NOT_FOUND)
            raise generic_error(result)
        return json_response(200, {})

    def add(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        files = _string_list(payload.get("files"), "files")
        if not files:
            raise bad_request('files must list at least one path (use "." for all)')
        result = self._commands.run(["add", "--", *files], path)
        if result.returncode != 0:
            if "did not match any files" in result.message:
                raise bad_request(result.message)
            raise generic_error(result)
        return json_response(200, {})

    def commit(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        message = _required_string(payload, "message", allow_empty=True)
        author = _required_string(payload, "author")
        email = _required_string(payload, "email")
        args = ["commit", "--quiet", "--no-verify", "-m", message]
        if payload.get("allow_empty") is True:
            args.append("--allow-empty")
        if message == "":
            args.append("--allow-empty-message")
        identity = [f"user.name={author}", f"user.email={email}"]
        result = self._commands.run(args, path, config=identity)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "nothing to commit" in lowered or "no changes added to commit" in lowered:
                raise DaemonError(
                    409, "nothing to commit (stage changes first or allow_empty)", "GIT_NOTHING_TO_COMMIT"
                )
            if "unmerged" in lowered or "conflict" in lowered:
                raise DaemonError(409, result.message, GIT_MERGE_CONFLICT)
            raise generic_error(result)
        head = self._commands.run(["rev-parse", "HEAD"], path)
        if head.returncode != 0:
            raise generic_error(head)
        return json_response(200, {"hash": head.stdout.strip()})

    def push(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        remote = _optional_string(payload, "remote") or "origin"
        branch = _optional_string(payload, "branch")
        args = ["push", "--porcelain"]
        if payload.get("set_upstream") is True:
            args.append("--set-upstream")
        args += [remote, branch or "HEAD"]
        result = self._commands.run(args, path, credentials=_credentials(payload))
        if result.returncode != 0:
            raise push_error(result)
        return json_response(200, {})

    def pull(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        remote = _optional_string(payload, "remote")
        branch = _optional_string(payload, "branch")
        args = ["pull", "--no-rebase", "--no-edit", "--quiet"]
        if branch or remote:
            args += [remote or "origin"]
            if branch:
                args.append(branch)
        elif not self._commands.has_upstream(path):
            current = self._commands.run(["symbolic-ref", "--quiet", "--short", "HEAD"], path).stdout.strip()
            args += ["origin"] + ([current] if current else [])
        result = self._commands.run(args, path, credentials=_credentials(payload))
        if result.returncode != 0:
            raise pull_error(result, branch)
        return json_response(200, {})

    def history(self, request: Request) -> Response:
        path = self._commands.repository(request.require_query("path"))
        result = self._commands.run(["log", "--format=%H%x00%an%x00%ae%x00%aI%x00%B%x1e"], path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "does not have any commits" in lowered or "bad default revision" in lowered:
                return json_response(200, [])
            raise generic_error(result)
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
        path = self._commands.resolve(payload.get("path"))
        args = ["init", "--quiet"]
        if payload.get("bare") is True:
            args.append("--bare")
        initial_branch = _optional_string(payload, "initial_branch")
        if initial_branch:
            args.append(f"--initial-branch={initial_branch}")
        args += ["--", path]
        result = self._commands.run(args)
        if result.returncode != 0:
            raise generic_error(result)
        return empty_response(201)

    def reset(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
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
        result = self._commands.run(args, path)
        if result.returncode != 0:
            lowered = result.message.lower()
            if "unknown revision" in lowered or "ambiguous argument" in lowered:
                raise DaemonError(404, f"revision not found: {target}", GIT_BRANCH_NOT_FOUND)
            raise generic_error(result)
        return json_response(200, {})

    def restore(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
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
        result = self._commands.run([*args, "--", *files], path)
        if result.returncode != 0:
            if "did not match any file" in result.message:
                raise bad_request(result.message)
            raise generic_error(result)
        return json_response(200, {})

    def add_remote(self, request: Request) -> Response:
        payload = request.json_object_body()
        path = self._commands.repository(payload.get("path"))
        name = _required_string(payload, "name")
        url = _required_string(payload, "url")
        result = self._commands.run(["remote", "add", "--", name, url], path)
        if result.returncode != 0:
            if "already exists" not in result.message:
                raise generic_error(result)
            if payload.get("overwrite") is not True:
                raise DaemonError(409, f"remote already exists: {name}", "GIT_REMOTE_EXISTS")
            result = self._commands.run(["remote", "set-url", "--", name, url], path)
            if result.returncode != 0:
                raise generic_error(result)
        if payload.get("fetch") is True:
            fetched = self._commands.run(["fetch", "--quiet", name], path)
            if fetched.returncode != 0:
                raise network_error(fetched)
        return empty_response(201)

    def list_remotes(self, request: Request) -> Response:
        path = self._commands.repository(request.require_query("path"))
        result = self._commands.run(["config", "--local", "-z", "--get-regexp", r"^remote\..*\.url$"], path)
        remotes = []
        if result.returncode == 0:
            for entry in result.stdout.split("\x00"):
                if not entry:
                    continue
                key, _, value = entry.partition("\n")
                name = key[len("remote.") : -len(".url")]
                remotes.append({"name": name, "url": value})
        elif result.returncode != 1:  # 1 means "no such key": no remotes
            raise generic_error(result)
        return json_response(200, {"remotes": remotes})

    def set_config(self, request: Request) -> Response:
        payload = request.json_object_body()
        key = _required_string(payload, "key")
        value = _required_string(payload, "value", allow_empty=True)
        scope, cwd = self._config_scope(payload.get("scope"), payload.get("path"))
        result = self._commands.run(["config", f"--{scope}", "--", key, value], cwd)
        if result.returncode != 0:
            raise config_error(result)
        return json_response(200, {})

    def get_config(self, request: Request) -> Response:
        key = request.require_query("key")
        scope, cwd = self._config_scope(request.query_value("scope"), request.query_value("path"))
        result = self._commands.run(["config", f"--{scope}", "--get", "--", key], cwd)
        if result.returncode == 1:
            return json_response(200, {})
        if result.returncode != 0:
            raise config_error(result)
        return json_response(200, {"value": result.stdout.rstrip("\n")})

    def configure_user(self, request: Request) -> Response:
        payload = request.json_object_body()
        name = _required_string(payload, "name")
        email = _required_string(payload, "email")
        scope, cwd = self._config_scope(payload.get("scope"), payload.get("path"))
        for key, value in (("user.name", name), ("user.email", email)):
            result = self._commands.run(["config", f"--{scope}", key, value], cwd)
            if result.returncode != 0:
                raise config_error(result)
        return json_response(200, {})

    def authenticate(self, request: Request) -> Response:
        payload = request.json_object_body()
        username = _required_string(payload, "username")
        password = _required_string(payload, "password")
        host = _optional_string(payload, "host") or "github.com"
        protocol = _optional_string(payload, "protocol") or "https"
        if any(char in value for value in (username, password, host, protocol) for char in "\n\x00"):
            raise bad_request("credentials must not contain newlines or NUL bytes")
        helper = self._commands.run(["config", "--global", "credential.helper"])
        if helper.returncode != 0 or not helper.stdout.strip():
            configured = self._commands.run(["config", "--global", "credential.helper", "store"])
            if configured.returncode != 0:
                raise config_error(configured)
        description = f"protocol={protocol}\nhost={host}\nusername={username}\npassword={password}\n\n"
        result = self._commands.run(["credential", "approve"], stdin=description)
        if result.returncode != 0:
            raise generic_error(result)
        return json_response(200, {})

    # -- helpers ----------------------------------------------------------------------------------

    def _config_scope(self, raw_scope: object, raw_path: object) -> tuple[str, str | None]:
        scope = raw_scope if isinstance(raw_scope, str) and raw_scope else "global"
        if scope not in CONFIG_SCOPES:
            raise bad_request(f"scope must be one of {', '.join(CONFIG_SCOPES)}")
        if scope == "local":
            if not raw_path:
                raise bad_request("path is required for the local scope")
            return scope, self._commands.repository(raw_path)
        if isinstance(raw_path, str) and raw_path:
            path = self._commands.resolve(raw_path)
            return scope, path if os.path.isdir(path) else None
        return scope, None


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
