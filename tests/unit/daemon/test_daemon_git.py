"""`/git/...` against the real daemon, with repositories served from this machine's loopback only:
bare repositories on disk and a smart-HTTP server with basic auth (tests/git_http_server.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
GIT_HTTP_SERVER = REPO_ROOT / "tests" / "git_http_server.py"
GIT_USER, GIT_PASSWORD = "alice", "s3cret-pw"
IDENTITY = {"author": "Test Author", "email": "author@example.com"}


def git(*args: str, cwd: Path | None = None) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Seed",
        "GIT_AUTHOR_EMAIL": "seed@example.com",
        "GIT_COMMITTER_NAME": "Seed",
        "GIT_COMMITTER_EMAIL": "seed@example.com",
        "GIT_CONFIG_GLOBAL": "/dev/null",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def remotes(tmp_path: Path) -> Path:
    """`remotes/origin.git`: a bare repo with `main` (2 commits) and `feature` (1 more)."""
    root = tmp_path / "remotes"
    seed = tmp_path / "seed"
    git("init", "--quiet", "--initial-branch=main", str(seed))
    (seed / "README.md").write_text("hello\n")
    git("add", ".", cwd=seed)
    git("commit", "--quiet", "-m", "first", cwd=seed)
    (seed / "second.txt").write_text("two\n")
    git("add", ".", cwd=seed)
    git("commit", "--quiet", "-m", "second", cwd=seed)
    git("checkout", "--quiet", "-b", "feature", cwd=seed)
    (seed / "feature.txt").write_text("feature\n")
    git("add", ".", cwd=seed)
    git("commit", "--quiet", "-m", "feature work", cwd=seed)
    git("checkout", "--quiet", "main", cwd=seed)
    root.mkdir()
    git("clone", "--quiet", "--bare", str(seed), str(root / "origin.git"))
    return root


@pytest.fixture
def home_dir(tmp_path: Path) -> Path:
    home = tmp_path / "home"  # the daemon fixture's HOME
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture
def git_client(daemon_client: httpx.Client, home_dir: Path) -> httpx.Client:
    return daemon_client


@pytest.fixture
def http_remote(remotes: Path) -> Iterator[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(GIT_HTTP_SERVER),
            "--root",
            str(remotes),
            "--port",
            "0",
            "--user",
            GIT_USER,
            "--password",
            GIT_PASSWORD,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def post(client: httpx.Client, endpoint: str, /, **body: Any) -> httpx.Response:
    return client.post(f"/git/{endpoint}", json=body)


def status(client: httpx.Client, path: str) -> dict[str, Any]:
    response = client.get("/git/status", params={"path": path})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status_code: int, code: str) -> None:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["code"] == code, body
    assert body["source"] == "DAYTONA_DAEMON"
    assert body["message"]


def test_clone_status_and_branches(git_client: httpx.Client, remotes: Path, work_dir: Path) -> None:
    response = post(git_client, "clone", url=str(remotes / "origin.git"), path="repo")
    assert response.status_code == 200, response.text
    assert (work_dir / "repo" / "README.md").read_text() == "hello\n"
    state = status(git_client, "repo")
    assert state["currentBranch"] == "main"
    assert state["fileStatus"] == []
    assert (state["ahead"], state["behind"], state["branchPublished"]) == (0, 0, True)
    assert state["upstream"] == "origin/main"
    branches = git_client.get("/git/branches", params={"path": "repo"}).json()
    assert branches == {"branches": ["main"], "current": "main"}


def test_clone_branch_and_commit(git_client: httpx.Client, remotes: Path, work_dir: Path) -> None:
    url = str(remotes / "origin.git")
    assert post(git_client, "clone", url=url, path="by-branch", branch="feature").status_code == 200
    assert status(git_client, "by-branch")["currentBranch"] == "feature"

    first = git("rev-list", "--max-parents=0", "main", cwd=remotes / "origin.git").strip()
    assert (
        post(git_client, "clone", url=url, path=str(work_dir / "by-commit"), commit_id=first).status_code
        == 200
    )
    assert git("rev-parse", "HEAD", cwd=work_dir / "by-commit").strip() == first
    state = status(git_client, "by-commit")
    assert state["detached"] is True
    assert not (work_dir / "by-commit" / "second.txt").exists()

    assert_error(
        post(git_client, "clone", url=url, path="bad-branch", branch="nope"), 404, "GIT_BRANCH_NOT_FOUND"
    )
    assert_error(post(git_client, "clone", url=url, path="by-branch"), 409, "GIT_DESTINATION_EXISTS")


def test_clone_missing_repository_and_transport_failure(git_client: httpx.Client, remotes: Path) -> None:
    response = post(git_client, "clone", url=str(remotes / "missing.git"), path="missing")
    assert_error(response, 404, "GIT_REPO_NOT_FOUND")
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    response = post(git_client, "clone", url=f"http://127.0.0.1:{closed_port}/x.git", path="nowhere")
    assert_error(response, 502, "GIT_TRANSPORT_FAILED")


def test_status_of_non_repositories_is_404(git_client: httpx.Client, work_dir: Path) -> None:
    (work_dir / "plain").mkdir()
    assert_error(git_client.get("/git/status", params={"path": "plain"}), 404, "GIT_REPO_NOT_FOUND")
    assert_error(git_client.get("/git/status", params={"path": "absent"}), 404, "GIT_REPO_NOT_FOUND")
    assert_error(git_client.get("/git/branches", params={"path": "absent"}), 404, "GIT_REPO_NOT_FOUND")


def test_file_statuses(git_client: httpx.Client, remotes: Path, work_dir: Path) -> None:
    post(git_client, "clone", url=str(remotes / "origin.git"), path="repo")
    repo = work_dir / "repo"
    (repo / "README.md").write_text("changed\n")
    (repo / "new.txt").write_text("new\n")
    (repo / "dir").mkdir()
    (repo / "dir" / "nested.txt").write_text("nested\n")
    (repo / "staged.txt").write_text("staged\n")
    git("add", "staged.txt", cwd=repo)
    git("mv", "second.txt", "renamed.txt", cwd=repo)
    by_name = {entry["name"]: entry for entry in status(git_client, "repo")["fileStatus"]}
    assert by_name["README.md"] == {
        "name": "README.md",
        "staging": "Unmodified",
        "worktree": "Modified",
        "extra": "",
    }
    assert (by_name["new.txt"]["staging"], by_name["new.txt"]["worktree"]) == ("Untracked", "Untracked")
    assert "dir/nested.txt" in by_name  # untracked files are listed one by one
    assert (by_name["staged.txt"]["staging"], by_name["staged.txt"]["worktree"]) == ("Added", "Unmodified")
    assert by_name["renamed.txt"]["staging"] == "Renamed"
    assert by_name["renamed.txt"]["extra"] == "second.txt"


def test_branch_lifecycle(git_client: httpx.Client, remotes: Path) -> None:
    post(git_client, "clone", url=str(remotes / "origin.git"), path="repo")
    assert post(git_client, "branches", path="repo", name="topic").status_code == 201
    assert status(git_client, "repo")["currentBranch"] == "topic"  # created and checked out, like upstream
    assert_error(post(git_client, "branches", path="repo", name="topic"), 409, "GIT_BRANCH_EXISTS")
    assert sorted(git_client.get("/git/branches", params={"path": "repo"}).json()["branches"]) == [
        "main",
        "topic",
    ]

    assert post(git_client, "checkout", path="repo", branch="main").status_code == 200
    assert status(git_client, "repo")["currentBranch"] == "main"
    # A branch that exists only on the remote is checked out as a tracking branch.
    assert post(git_client, "checkout", path="repo", branch="feature").status_code == 200
    assert status(git_client, "repo")["currentBranch"] == "feature"
    assert_error(post(git_client, "checkout", path="repo", branch="no-such"), 404, "GIT_BRANCH_NOT_FOUND")

    # DELETE carries a JSON body, as the SDK sends it.
    response = git_client.request("DELETE", "/git/branches", json={"path": "repo", "name": "topic"})
    assert response.status_code == 204
    assert "topic" not in git_client.get("/git/branches", params={"path": "repo"}).json()["branches"]
    missing = git_client.request("DELETE", "/git/branches", json={"path": "repo", "name": "topic"})
    assert_error(missing, 404, "GIT_BRANCH_NOT_FOUND")


def test_add_commit_push_pull(git_client: httpx.Client, remotes: Path, work_dir: Path) -> None:
    url = str(remotes / "origin.git")
    post(git_client, "clone", url=url, path="one")
    post(git_client, "clone", url=url, path="two")
    (work_dir / "one" / "change.txt").write_text("change\n")
    assert post(git_client, "add", path="one", files=["change.txt"]).status_code == 200
    assert status(git_client, "one")["fileStatus"][0]["staging"] == "Added"
    response = post(git_client, "commit", path="one", message="add change", **IDENTITY)
    assert response.status_code == 200, response.text
    sha = response.json()["hash"]
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert git("log", "-1", "--format=%an <%ae>|%s", cwd=work_dir / "one").strip() == (
        "Test Author <author@example.com>|add change"
    )
    assert status(git_client, "one")["ahead"] == 1

    assert_error(
        post(git_client, "commit", path="one", message="nothing", **IDENTITY), 409, "GIT_NOTHING_TO_COMMIT"
    )
    empty = post(git_client, "commit", path="one", message="empty", allow_empty=True, **IDENTITY)
    assert empty.status_code == 200 and empty.json()["hash"] != sha

    assert post(git_client, "push", path="one").status_code == 200
    assert git("rev-parse", "main", cwd=remotes / "origin.git").strip() == empty.json()["hash"]
    assert status(git_client, "one")["ahead"] == 0

    assert post(git_client, "pull", path="two").status_code == 200
    assert (work_dir / "two" / "change.txt").read_text() == "change\n"

    # `two` is now behind nothing; make it diverge and push: rejected.
    (work_dir / "one" / "more.txt").write_text("more\n")
    post(git_client, "add", path="one", files=["."])
    post(git_client, "commit", path="one", message="more", **IDENTITY)
    post(git_client, "push", path="one")
    (work_dir / "two" / "other.txt").write_text("other\n")
    post(git_client, "add", path="two", files=["."])
    post(git_client, "commit", path="two", message="other", **IDENTITY)
    assert_error(post(git_client, "push", path="two"), 409, "GIT_PUSH_REJECTED")


def test_push_new_branch_with_upstream(git_client: httpx.Client, remotes: Path) -> None:
    post(git_client, "clone", url=str(remotes / "origin.git"), path="repo")
    post(git_client, "branches", path="repo", name="published")
    assert status(git_client, "repo")["branchPublished"] is False
    post(git_client, "commit", path="repo", message="on published", allow_empty=True, **IDENTITY)
    assert post(git_client, "push", path="repo", set_upstream=True).status_code == 200
    state = status(git_client, "repo")
    assert (state["branchPublished"], state["upstream"]) == (True, "origin/published")
    assert "published" in git("branch", "--list", cwd=remotes / "origin.git")


def test_http_credentials_are_used_once_and_never_stored(
    git_client: httpx.Client, http_remote: str, work_dir: Path, home_dir: Path
) -> None:
    url = f"{http_remote}/origin.git"
    assert_error(post(git_client, "clone", url=url, path="anon"), 401, "GIT_AUTH_FAILED")
    wrong = post(git_client, "clone", url=url, path="wrong", username=GIT_USER, password="wrong")
    assert_error(wrong, 401, "GIT_AUTH_FAILED")
    response = post(git_client, "clone", url=url, path="authed", username=GIT_USER, password=GIT_PASSWORD)
    assert response.status_code == 200, response.text
    assert status(git_client, "authed")["currentBranch"] == "main"
    missing = post(
        git_client,
        "clone",
        url=f"{http_remote}/missing.git",
        path="m",
        username=GIT_USER,
        password=GIT_PASSWORD,
    )
    assert_error(missing, 404, "GIT_REPO_NOT_FOUND")

    # Nothing about the password was written anywhere.
    for written in [*(work_dir / "authed" / ".git").rglob("*"), *home_dir.rglob("*")]:
        if written.is_file():
            assert GIT_PASSWORD.encode() not in written.read_bytes(), written

    (work_dir / "authed" / "pushed.txt").write_text("over http\n")
    post(git_client, "add", path="authed", files=["."])
    post(git_client, "commit", path="authed", message="http push", **IDENTITY)
    assert_error(post(git_client, "push", path="authed"), 401, "GIT_AUTH_FAILED")
    pushed = post(git_client, "push", path="authed", username=GIT_USER, password=GIT_PASSWORD)
    assert pushed.status_code == 200, pushed.text
    assert_error(
        post(git_client, "pull", path="authed", username=GIT_USER, password="bad"), 401, "GIT_AUTH_FAILED"
    )
    assert (
        post(git_client, "pull", path="authed", username=GIT_USER, password=GIT_PASSWORD).status_code == 200
    )


def test_stored_credentials(git_client: httpx.Client, http_remote: str, home_dir: Path) -> None:
    host = http_remote.removeprefix("http://")
    response = post(
        git_client, "credentials", username=GIT_USER, password=GIT_PASSWORD, host=host, protocol="http"
    )
    assert response.status_code == 200, response.text
    assert GIT_PASSWORD in (home_dir / ".git-credentials").read_text()
    assert post(git_client, "clone", url=f"{http_remote}/origin.git", path="stored").status_code == 200


def test_init_remotes_config_reset_restore_history(
    git_client: httpx.Client, remotes: Path, work_dir: Path
) -> None:
    assert post(git_client, "init", path="fresh", initial_branch="trunk").status_code == 201
    assert status(git_client, "fresh")["currentBranch"] == "trunk"
    assert git_client.get("/git/history", params={"path": "fresh"}).json() == []
    assert post(git_client, "init", path="bare.git", bare=True).status_code == 201
    assert (work_dir / "bare.git" / "HEAD").exists()

    assert (
        post(
            git_client, "remotes", path="fresh", name="origin", url=str(remotes / "origin.git"), fetch=True
        ).status_code
        == 201
    )
    assert git_client.get("/git/remotes", params={"path": "fresh"}).json() == {
        "remotes": [{"name": "origin", "url": str(remotes / "origin.git")}]
    }
    assert post(git_client, "remotes", path="fresh", name="origin", url="/elsewhere").status_code == 409
    assert (
        post(git_client, "remotes", path="fresh", name="origin", url="/elsewhere", overwrite=True).status_code
        == 201
    )
    assert (
        git_client.get("/git/remotes", params={"path": "fresh"}).json()["remotes"][0]["url"] == "/elsewhere"
    )

    assert post(git_client, "config", key="user.name", value="Global Name").status_code == 200
    assert git_client.get("/git/config", params={"key": "user.name"}).json() == {"value": "Global Name"}
    assert git_client.get("/git/config", params={"key": "user.unset"}).json() == {}
    assert (
        post(
            git_client, "config/user", name="Local", email="l@example.com", scope="local", path="fresh"
        ).status_code
        == 200
    )
    local = git_client.get(
        "/git/config", params={"key": "user.email", "scope": "local", "path": "fresh"}
    ).json()
    assert local == {"value": "l@example.com"}

    post(git_client, "clone", url=str(remotes / "origin.git"), path="repo")
    repo = work_dir / "repo"
    (repo / "README.md").write_text("edited\n")
    post(git_client, "add", path="repo", files=["README.md"])
    assert post(git_client, "reset", path="repo", files=["README.md"]).status_code == 200  # unstage
    assert status(git_client, "repo")["fileStatus"][0]["staging"] == "Unmodified"
    assert post(git_client, "restore", path="repo", files=["README.md"]).status_code == 200
    assert (repo / "README.md").read_text() == "hello\n"
    assert post(git_client, "reset", path="repo", mode="hard", target="HEAD~1").status_code == 200
    assert not (repo / "second.txt").exists()
    assert post(git_client, "reset", path="repo", mode="bogus").status_code == 400

    history = git_client.get("/git/history", params={"path": "repo"}).json()
    assert [entry["message"] for entry in history] == ["first"]
    assert set(history[0]) == {"hash", "author", "email", "message", "timestamp"}
    assert history[0]["author"] == "Seed"


def test_invalid_requests(git_client: httpx.Client) -> None:
    assert post(git_client, "clone", path="x").status_code == 400  # no url
    assert git_client.get("/git/status").status_code == 400  # no path
    assert post(git_client, "add", path=".", files="README.md").status_code in (400, 404)
