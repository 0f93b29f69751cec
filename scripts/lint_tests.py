"""Lint for the test suite (run by `make lint` and by tests/unit/test_lint_tests.py): no timing
assertions, no memory figures, no sleeps used to wait for an outcome.

Rules, checked on the syntax tree of every tests/**/*.py except tests/bench/ (benchmarks measure time) and
tests/polling.py (the one polling helper):

- `sleep`: a call to `time.sleep` or `asyncio.sleep` (also imported by name). Wait with
  `tests.polling.wait_until` / `wait_until_async` instead. Sleeps inside strings (commands run in a
  sandbox) are not calls and do not count.
- `timing`: an `assert` that uses a duration clock (`time.monotonic`, `time.perf_counter`,
  `time.process_time`, their `_ns` forms), directly or through a local name assigned from one (e.g.
  `started = time.monotonic(); ... assert time.monotonic() - started < 2`). Wall-clock `time.time()`
  checks of timestamps the code produced (an expiry, a reported time) are not durations and are allowed.
- `memory`: reading a process's memory figures (`VmRSS`, `VmHWM`, `VmPeak`, `ru_maxrss`).

Exit status 1 and one line per finding (path:line: rule: text) when anything is found.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = REPO_ROOT / "tests"
SKIPPED = (TESTS / "bench", TESTS / "polling.py")
# (path relative to the repo, function) -> why a sleep there waits for nothing.
ALLOWED_SLEEPS: dict[tuple[str, str], str] = {
    (
        "tests/unit/daemon/test_daemon_websocket.py",
        "test_raw_fragments_with_interleaved_ping_and_close_handshake",
    ): "paces a byte-by-byte write so the server reads split frames; no outcome is awaited",
}
# (path relative to the repo, function) -> why reading memory there checks a behaviour, not a figure.
ALLOWED_MEMORY: dict[tuple[str, str], str] = {
    ("tests/integration/test_api_limits.py", "rss_bytes"): (
        "issue #9: a refused 100 MB body must never be buffered; the bound is the body's size, not a figure"
    ),
}
SLEEPS = {("time", "sleep"), ("asyncio", "sleep")}
DURATION_CLOCKS = {
    ("time", name)
    for name in ("monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "process_time")
}
MEMORY_FIGURES = ("VmRSS", "VmHWM", "VmPeak", "ru_maxrss")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.text}"


class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.source = source
        self.findings: list[Finding] = []
        self.imported: dict[str, tuple[str, str]] = {}  # local name -> (module, function)
        self.function: list[str] = []
        self.tainted: list[set[str]] = [set()]  # names holding a duration clock reading, per scope

    def _qualified(self, node: ast.expr) -> tuple[str, str] | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return node.value.id, node.attr
        if isinstance(node, ast.Name):
            return self.imported.get(node.id)
        return None

    def _add(self, node: ast.AST, rule: str) -> None:
        text = ast.get_source_segment(self.source, node) or ""
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), rule, text.splitlines()[0]))

    def _reads_clock(self, node: ast.AST) -> bool:
        for child in ast.walk(node):
            if isinstance(child, ast.Call) and self._qualified(child.func) in DURATION_CLOCKS:
                return True
            if isinstance(child, ast.Name) and any(child.id in scope for scope in self.tainted):
                return True
        return False

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if node.module in ("time", "asyncio"):
                self.imported[alias.asname or alias.name] = (node.module, alias.name)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function.append(node.name)
        self.tainted.append(set())
        self.generic_visit(node)
        self.tainted.pop()
        self.function.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Assign(self, node: ast.Assign) -> None:
        if self._reads_clock(node.value):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        self.tainted[-1].add(name.id)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name) and self._reads_clock(node.value):
            self.tainted[-1].add(node.target.id)
        self.generic_visit(node)

    def visit_Assert(self, node: ast.Assert) -> None:
        if self._reads_clock(node.test):
            self._add(node, "timing")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if self._qualified(node.func) in SLEEPS:
            allowed = any((self.path, function) in ALLOWED_SLEEPS for function in self.function)
            if not allowed:
                self._add(node, "sleep")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        is_figure = isinstance(node.value, str) and any(figure in node.value for figure in MEMORY_FIGURES)
        if is_figure and not any((self.path, function) in ALLOWED_MEMORY for function in self.function):
            self._add(node, "memory")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr == "ru_maxrss":
            self._add(node, "memory")
        self.generic_visit(node)


def check_source(path: str, source: str) -> list[Finding]:
    checker = _Checker(path, source)
    checker.visit(ast.parse(source, filename=path))
    return checker.findings


def linted_files(root: Path = TESTS) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not any(path == skipped or skipped in path.parents for skipped in SKIPPED):
            yield path


def check_tree(root: Path = TESTS) -> list[Finding]:
    findings: list[Finding] = []
    for path in linted_files(root):
        findings += check_source(str(path.relative_to(REPO_ROOT)), path.read_text())
    return findings


def main() -> int:
    findings = check_tree()
    for finding in findings:
        print(finding)
    if findings:
        print(f"{len(findings)} finding(s): wait with tests/polling.py; measure speed with `make bench`")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
