"""scripts/lint_tests.py (run by `make lint`): the suite has no timing assertions, memory figures or sleeps
used as synchronisation, and the lint finds each kind (issue #18)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lint_tests", REPO_ROOT / "scripts" / "lint_tests.py")
assert _spec is not None and _spec.loader is not None
lint = importlib.util.module_from_spec(_spec)
sys.modules["lint_tests"] = lint  # dataclasses look their module up by name
_spec.loader.exec_module(lint)

PATH = "tests/unit/test_sample.py"


def rules(source: str, path: str = PATH) -> list[tuple[int, str]]:
    return [(finding.line, finding.rule) for finding in lint.check_source(path, source)]


def test_the_suite_is_clean() -> None:
    assert [str(finding) for finding in lint.check_tree()] == []


def test_sleeps_are_found_in_any_spelling() -> None:
    source = """
import asyncio, time
from time import sleep
from asyncio import sleep as pause

async def test_a():
    time.sleep(1)
    await asyncio.sleep(0.1)
    sleep(2)
    await pause(3)
    run("sleep 5; time.sleep(1)")  # in a string: a command for a sandbox, not a sleep here
"""
    assert rules(source) == [(7, "sleep"), (8, "sleep"), (9, "sleep"), (10, "sleep")]


def test_timing_assertions_are_found_directly_and_through_names() -> None:
    source = """
import time
from time import perf_counter

def test_a():
    started = time.monotonic()
    work()
    elapsed = time.monotonic() - started
    assert elapsed < 2
    assert time.monotonic() - started < 4, "slow"
    begin = perf_counter()
    assert perf_counter() - begin < 0.25
    assert result == 3
    assert abs(stamp - time.time()) < 30  # a timestamp the code reported, not a duration
"""
    assert rules(source) == [(9, "timing"), (10, "timing"), (12, "timing")]


def test_memory_figures_are_found() -> None:
    source = """
import resource

def test_a(pid):
    status = open(f"/proc/{pid}/status").read()
    assert "PEAK:" in status
    assert resource.getrusage(resource.RUSAGE_SELF).MAXRSS < 1000
"""
    # Spelled apart here, so this file's own text holds no memory figure.
    source = source.replace("PEAK", "Vm" + "HWM").replace("MAXRSS", "ru_" + "maxrss")
    assert rules(source) == [(6, "memory"), (7, "memory")]


def test_the_allow_list_is_by_file_and_function() -> None:
    ((path, function),) = lint.ALLOWED_SLEEPS
    source = (
        f"import time\n\ndef {function}():\n    time.sleep(0.001)\n\ndef other():\n    time.sleep(0.001)\n"
    )
    assert rules(source, path) == [(7, "sleep")]
    assert rules(source) == [(4, "sleep"), (7, "sleep")]


def test_bench_and_the_polling_helper_are_not_linted() -> None:
    linted = {path.relative_to(REPO_ROOT).as_posix() for path in lint.linted_files()}
    assert "tests/polling.py" not in linted
    assert not any(path.startswith("tests/bench/") for path in linted)
    assert "tests/unit/test_lint_tests.py" in linted and "tests/conftest.py" in linted
