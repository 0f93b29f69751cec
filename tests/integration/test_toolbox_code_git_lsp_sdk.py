"""Code run, code interpreter, git and LSP end to end through the official SDK (daytona==0.226.1) against a
real stack and the default image.

Git never leaves the sandbox: the tests serve repositories from the sandbox's own loopback, with
`git daemon` (git://127.0.0.1:9418) and a smart-HTTP server with basic auth (tests/git_http_server.py,
http://127.0.0.1:8418), both started through `sandbox.process.exec`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from daytona import (
    BarChart,
    ChartType,
    CodeRunParams,
    CreateSandboxFromSnapshotParams,
    Daytona,
    DaytonaError,
    DaytonaGitAuthFailedError,
    DaytonaGitRepoNotFoundError,
    DaytonaNotFoundError,
    DaytonaTimeoutError,
    LineChart,
    LspCompletionPosition,
    Sandbox,
)

from tests.integration.stackthread import StackThread

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]

REPO_ROOT = Path(__file__).resolve().parents[2]
GIT_HTTP_SERVER = REPO_ROOT / "tests" / "git_http_server.py"
REMOTES = "/tmp/git-remotes"
GIT_DAEMON_URL = "git://127.0.0.1:9418"
GIT_HTTP_URL = "http://127.0.0.1:8418"
GIT_USER, GIT_PASSWORD = "alice", "s3cret-pw"
AUTHOR = {"author": "SDK Tester", "email": "sdk@example.com"}

SAMPLE_PY = '''class Greeter:
    """Says hello."""

    def greet(self, name: str) -> str:
        return f"Hello, {name}!"


def make_greeter() -> Greeter:
    return Greeter()


greeter = make_greeter()
greeter.
'''

SAMPLE_TS = """export class Greeter {
  greet(name: string): string {
    return `Hello, ${name}!`;
  }
}

const greeter = new Greeter();
greeter.
"""


@pytest.fixture(scope="module")
def daytona(stack: StackThread) -> Daytona:
    return Daytona()


@pytest.fixture(scope="module")
def sandbox(daytona: Daytona) -> Iterator[Sandbox]:
    created = daytona.create(CreateSandboxFromSnapshotParams(language="python"), timeout=300)
    try:
        yield created
    finally:
        daytona.delete(created)


def exec_ok(sandbox: Sandbox, command: str) -> str:
    response = sandbox.process.exec(command, timeout=60)
    assert response.exit_code == 0, f"{command!r} -> {response.exit_code}: {response.result}"
    return response.result


# -- code_run ---------------------------------------------------------------------------------------


def test_code_run_python(sandbox: Sandbox) -> None:
    response = sandbox.process.code_run('print("Hello, World!")')
    assert (response.exit_code, response.result) == (0, "Hello, World!\n")
    assert response.artifacts is not None and response.artifacts.stdout == "Hello, World!\n"
    assert response.artifacts.charts == []

    multiline = sandbox.process.code_run(
        "x = 10\ny = 20\nfor i in range(2):\n    print(f'Sum: {x + y + i}')\n"
    )
    assert multiline.result == "Sum: 30\nSum: 31\n"

    stderr = sandbox.process.code_run("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)")
    assert stderr.exit_code == 0
    assert "to stdout" in stderr.result and "to stderr" in stderr.result

    broken = sandbox.process.code_run("def broken(:\n    pass")
    assert broken.exit_code != 0
    assert "SyntaxError" in broken.result

    raised = sandbox.process.code_run("raise ValueError('bad')")
    assert raised.exit_code == 1 and raised.result.rstrip().endswith("ValueError: bad")


def test_code_run_result_parses_and_params(sandbox: Sandbox) -> None:
    listed = sandbox.process.code_run("import json\nprint(json.dumps([1, 2, {'k': 'v'}]))")
    assert json.loads(listed.result.strip()) == [1, 2, {"k": "v"}]
    params = CodeRunParams(argv=["first", "second arg"], env={"CODE_RUN_VAR": "from-env"})
    code = (
        "import json, os, sys\nprint(json.dumps({'argv': sys.argv[1:], 'env': os.environ['CODE_RUN_VAR']}))"
    )
    response = sandbox.process.code_run(code, params=params)
    assert json.loads(response.result) == {"argv": ["first", "second arg"], "env": "from-env"}


def test_code_run_timeout(sandbox: Sandbox) -> None:
    # The daemon answers 408 PROCESS_EXECUTION_TIMEOUT like exec; `code_run` is the one SDK method without
    # `intercept_errors`, so it surfaces as the generated client's ApiException (status 408).
    with pytest.raises(Exception) as raised:
        sandbox.process.code_run("import time\ntime.sleep(30)", timeout=1)
    assert getattr(raised.value, "status", None) == 408
    assert "timeout" in str(raised.value).lower()


def test_code_run_matplotlib_chart(sandbox: Sandbox) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "x = np.linspace(0, 10, 30)\n"
        "plt.figure(figsize=(8, 5))\n"
        "plt.plot(x, np.sin(x), 'b-', linewidth=2, label='sin')\n"
        "plt.title('Line Chart')\n"
        "plt.xlabel('X-axis (seconds)')\n"
        "plt.ylabel('Y-axis (amplitude)')\n"
        "plt.grid(True)\n"
        "plt.show()\n"
        "fig, ax = plt.subplots()\n"
        "ax.bar(['red', 'green'], [3, 7], label='votes')\n"
        "ax.set_title('Bar Chart')\n"
        "print('plotted')\n"
    )
    response = sandbox.process.code_run(code)
    assert response.exit_code == 0, response.result
    assert response.result == "plotted\n"
    assert response.artifacts is not None
    line, bar = response.artifacts.charts
    assert isinstance(line, LineChart) and line.type == ChartType.LINE
    assert (line.title, line.x_label, line.y_label) == (
        "Line Chart",
        "X-axis (seconds)",
        "Y-axis (amplitude)",
    )
    assert line.elements[0].label == "sin"
    assert len(line.elements[0].points) == 30
    assert line.x_scale == "linear" and line.x_ticks
    assert base64.b64decode(line.png).startswith(b"\x89PNG")
    assert isinstance(bar, BarChart) and bar.title == "Bar Chart"
    assert [(element.label, element.value) for element in bar.elements] == [("red", "3"), ("green", "7")]


@pytest.mark.parametrize("language", ["javascript", "typescript"])
def test_code_run_node_languages(daytona: Daytona, language: str) -> None:
    node_sandbox = daytona.create(CreateSandboxFromSnapshotParams(language=language), timeout=300)
    try:
        assert node_sandbox.labels.get("code-toolbox-language") == language
        typed = "const n: number = 21;" if language == "typescript" else "const n = 21;"
        code = f"{typed}\nconsole.log(JSON.stringify({{double: n * 2, argv: process.argv.slice(2)}}));"
        response = node_sandbox.process.code_run(code, params=CodeRunParams(argv=["a1"]))
        assert response.exit_code == 0, response.result
        assert response.result == '{"double":42,"argv":["a1"]}\n'
        failing = node_sandbox.process.code_run("console.error('nope'); process.exit(5)")
        assert (failing.exit_code, failing.result) == (5, "nope\n")
    finally:
        daytona.delete(node_sandbox)


# -- code interpreter -------------------------------------------------------------------------------


def test_code_interpreter(sandbox: Sandbox) -> None:
    interpreter = sandbox.code_interpreter
    streamed: list[str] = []
    result = interpreter.run_code(
        "print('Hello from the interpreter')", on_stdout=lambda m: streamed.append(m.output)
    )
    assert result.error is None
    assert result.stdout == "Hello from the interpreter\n"
    assert "".join(streamed) == "Hello from the interpreter\n"

    assert interpreter.run_code("counter = 10\nimport math").error is None
    persisted = interpreter.run_code("counter += 5\nprint(counter, math.floor(2.5))")
    assert (persisted.stdout, persisted.error) == ("15 2\n", None)

    failed = interpreter.run_code("raise ValueError('Invalid value')")
    assert failed.error is not None
    assert failed.error.name == "ValueError" and "Invalid value" in failed.error.value
    assert "Traceback" in failed.error.traceback

    stderr = interpreter.run_code("import sys\nsys.stderr.write('warned\\n')")
    assert stderr.stderr == "warned\n" and stderr.error is None


def test_code_interpreter_contexts(sandbox: Sandbox) -> None:
    interpreter = sandbox.code_interpreter
    sandbox.fs.create_folder("interp-ctx", "755")
    context = interpreter.create_context(cwd="interp-ctx")
    try:
        assert context.language == "python" and context.active is True
        assert context.cwd.endswith("/interp-ctx")
        interpreter.run_code("isolated_value = 'only here'", context=context)
        inside = interpreter.run_code("import os\nprint(isolated_value, os.getcwd())", context=context)
        assert inside.stdout == f"only here {context.cwd}\n"
        outside = interpreter.run_code("print(isolated_value)")
        assert outside.error is not None and outside.error.name == "NameError"
        assert context.id in {listed.id for listed in interpreter.list_contexts()}
    finally:
        interpreter.delete_context(context)
    assert context.id not in {listed.id for listed in interpreter.list_contexts()}


def test_code_interpreter_timeout(sandbox: Sandbox) -> None:
    interpreter = sandbox.code_interpreter
    interpreter.run_code("survivor = 'kept'")
    with pytest.raises(DaytonaTimeoutError):
        interpreter.run_code("import time\ntime.sleep(60)", timeout=1)
    assert interpreter.run_code("print(survivor)").stdout == "kept\n"


# -- git --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def git_remotes(sandbox: Sandbox) -> str:
    """A bare `origin.git` (main + feature) served by git daemon and by smart HTTP, inside the sandbox."""
    seed = "/tmp/git-seed"
    exec_ok(
        sandbox,
        f"""set -e
        export GIT_AUTHOR_NAME=Seed GIT_AUTHOR_EMAIL=seed@example.com
        export GIT_COMMITTER_NAME=Seed GIT_COMMITTER_EMAIL=seed@example.com
        rm -rf {seed} {REMOTES} && mkdir -p {REMOTES}
        git init -q --initial-branch=main {seed} && cd {seed}
        echo hello > README.md && git add . && git commit -qm first
        echo two > second.txt && git add . && git commit -qm second
        git checkout -qb feature && echo feature > feature.txt && git add . && git commit -qm feature
        git checkout -q main
        git clone -q --bare {seed} {REMOTES}/origin.git
        """,
    )
    sandbox.fs.upload_file(GIT_HTTP_SERVER.read_bytes(), "/tmp/git_http_server.py")
    exec_ok(
        sandbox,
        f"nohup git daemon --reuseaddr --export-all --enable=receive-pack --base-path={REMOTES} "
        f"--listen=127.0.0.1 --port=9418 {REMOTES} >/tmp/git-daemon.log 2>&1 &\n"
        f"nohup python3 /tmp/git_http_server.py --root {REMOTES} --port 8418 --user {GIT_USER} "
        f"--password {GIT_PASSWORD} >/tmp/git-http.log 2>&1 &\n",
    )
    exec_ok(
        sandbox,
        "for port in 9418 8418; do for i in $(seq 100); do "
        "(echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done; done; "
        "(echo > /dev/tcp/127.0.0.1/9418) && (echo > /dev/tcp/127.0.0.1/8418)",
    )
    return f"{GIT_DAEMON_URL}/origin.git"


def test_git_clone_status_branches_commit_push(sandbox: Sandbox, git_remotes: str) -> None:
    git = sandbox.git
    git.clone(git_remotes, "repo")
    assert sandbox.fs.get_file_info("repo").is_dir is True
    status = git.status("repo")
    assert status.current_branch == "main"
    assert status.file_status == []
    assert "main" in git.branches("repo").branches

    git.create_branch("repo", "topic")
    git.checkout_branch("repo", "topic")
    assert git.status("repo").current_branch == "topic"

    sandbox.fs.upload_file(b"new content\n", "repo/new-file.txt")
    untracked = {entry.name: entry for entry in git.status("repo").file_status}
    assert untracked["new-file.txt"].worktree == "Untracked"
    git.add("repo", ["new-file.txt"])
    assert {entry.name: entry for entry in git.status("repo").file_status}["new-file.txt"].staging == "Added"
    commit = git.commit("repo", "Add new file", **AUTHOR)
    assert len(commit.sha) >= 7
    empty = git.commit("repo", "Empty commit", allow_empty=True, **AUTHOR)
    assert empty.sha != commit.sha
    log = exec_ok(sandbox, "git -C repo log -2 --format='%an <%ae> %s'")
    assert log.splitlines() == [
        "SDK Tester <sdk@example.com> Empty commit",
        "SDK Tester <sdk@example.com> Add new file",
    ]

    git.push("repo", set_upstream=True)
    assert exec_ok(sandbox, f"git --git-dir={REMOTES}/origin.git rev-parse topic").strip() == empty.sha
    status = git.status("repo")
    assert status.branch_published is True and status.ahead == 0

    git.checkout_branch("repo", "main")
    git.delete_branch("repo", "topic")
    assert "topic" not in git.branches("repo").branches


def test_git_clone_branch_commit_and_pull(sandbox: Sandbox, git_remotes: str) -> None:
    git = sandbox.git
    git.clone(git_remotes, "repo-feature", branch="feature")
    assert git.status("repo-feature").current_branch == "feature"

    first = exec_ok(sandbox, f"git --git-dir={REMOTES}/origin.git rev-list --max-parents=0 main").strip()
    git.clone(git_remotes, "repo-at-commit", commit_id=first)
    assert exec_ok(sandbox, "git -C repo-at-commit rev-parse HEAD").strip() == first

    git.clone(git_remotes, "pusher")
    git.clone(git_remotes, "puller")
    sandbox.fs.upload_file(b"pulled\n", "pusher/pulled.txt")
    git.add("pusher", ["."])
    git.commit("pusher", "to be pulled", **AUTHOR)
    git.push("pusher")
    git.pull("puller")
    assert sandbox.fs.download_file("puller/pulled.txt") == b"pulled\n"


def test_git_errors(sandbox: Sandbox, git_remotes: str) -> None:
    git = sandbox.git
    http_url = f"{GIT_HTTP_URL}/origin.git"
    with pytest.raises(DaytonaGitAuthFailedError):
        git.clone(http_url, "http-wrong", username=GIT_USER, password="wrong-password")
    with pytest.raises(DaytonaGitAuthFailedError):
        git.clone(http_url, "http-anonymous")
    git.clone(http_url, "http-authed", username=GIT_USER, password=GIT_PASSWORD)
    assert git.status("http-authed").current_branch == "main"
    stored = exec_ok(sandbox, "cat http-authed/.git/config; cat ~/.git-credentials 2>/dev/null || true")
    assert GIT_PASSWORD not in stored

    with pytest.raises(DaytonaGitRepoNotFoundError):
        git.clone(f"{GIT_DAEMON_URL}/missing.git", "missing-repo")
    with pytest.raises(DaytonaNotFoundError):
        git.status("not-a-repo-dir")
    with pytest.raises(DaytonaError):
        git.checkout_branch("http-authed", "no-such-branch")


# -- LSP --------------------------------------------------------------------------------------------


def test_lsp_python(sandbox: Sandbox) -> None:
    sandbox.fs.create_folder("lsp-project", "755")
    sandbox.fs.upload_file(SAMPLE_PY.encode(), "lsp-project/sample.py")
    lsp = sandbox.create_lsp_server("python", "lsp-project")
    lsp.start()
    try:
        lsp.did_open("lsp-project/sample.py")
        symbols = lsp.document_symbols("lsp-project/sample.py")
        assert "Greeter" in {symbol.name for symbol in symbols}
        assert {symbol.name: symbol.kind for symbol in symbols}["Greeter"] == 5
        workspace = lsp.sandbox_symbols("Greeter")
        assert len(workspace) >= 1 and "Greeter" in {symbol.name for symbol in workspace}
        completions = lsp.completions("lsp-project/sample.py", LspCompletionPosition(line=12, character=8))
        assert completions.items
        assert any(item.label.startswith("greet") for item in completions.items)
        lsp.did_close("lsp-project/sample.py")
    finally:
        lsp.stop()


def test_lsp_typescript(sandbox: Sandbox) -> None:
    sandbox.fs.create_folder("ts-lsp-project", "755")
    sandbox.fs.upload_file(SAMPLE_TS.encode(), "ts-lsp-project/sample.ts")
    lsp = sandbox.create_lsp_server("typescript", "ts-lsp-project")
    lsp.start()
    try:
        lsp.did_open("ts-lsp-project/sample.ts")
        symbols = lsp.document_symbols("ts-lsp-project/sample.ts")
        assert "Greeter" in {symbol.name for symbol in symbols}
        assert len(lsp.sandbox_symbols("Greeter")) >= 1
        completions = lsp.completions("ts-lsp-project/sample.ts", LspCompletionPosition(line=7, character=8))
        assert "greet" in {item.label for item in completions.items}
        lsp.did_close("ts-lsp-project/sample.ts")
    finally:
        lsp.stop()


def test_lsp_before_start_is_a_bad_request(sandbox: Sandbox) -> None:
    sandbox.fs.create_folder("lsp-unstarted", "755")
    lsp = sandbox.create_lsp_server("python", "lsp-unstarted")
    with pytest.raises(DaytonaError) as raised:
        lsp.document_symbols("lsp-unstarted/x.py")
    assert raised.value.status_code == 400
