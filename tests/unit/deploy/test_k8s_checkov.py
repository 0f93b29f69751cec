"""checkov on every overlay of deploy/k8s finds nothing but the accepted findings of
deploy/k8s/tests/checkov-skips.yaml, each with its reason, and every accepted finding still occurs.

checkov runs from its own virtualenv (.venv/checkov, made by `make venv`): it pins packaging<24, which the
project's pytest cannot share.
"""

from __future__ import annotations

import json
import subprocess

import yaml

from tests.unit.deploy.k8s import OVERLAYS, REPO, TESTS_DIR, render_overlay

CHECKOV = REPO / ".venv" / "checkov" / "bin" / "checkov"


def test_checkov_finds_only_accepted_findings(tmp_path) -> None:
    assert CHECKOV.exists(), "make venv installs checkov (deploy/k8s/tests/checkov-requirements.txt)"
    files = []
    for overlay in OVERLAYS:
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(render_overlay(overlay), sort_keys=False))
        files += ["-f", str(path)]
    result = subprocess.run(
        [str(CHECKOV), *files, "--framework", "kubernetes", "--skip-download", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BC_SKIP_MAPPING": "TRUE"},
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert sum(report["summary"]["passed"] for report in reports) > 1000  # it did check something
    found = {(f["check_id"], f["resource"]) for r in reports for f in r["results"]["failed_checks"]}
    skips = yaml.safe_load((TESTS_DIR / "checkov-skips.yaml").read_text())
    assert all(entry["reason"].strip() for entry in skips.values())
    unexpected = sorted(
        (check, resource)
        for check, resource in found
        if check not in skips or not {"*", resource} & set(skips[check]["resources"])
    )
    assert not unexpected, f"new checkov findings (fix them, or accept one with a reason): {unexpected}"
    stale = sorted(
        (check, resource)
        for check, entry in skips.items()
        for resource in entry["resources"]
        if not any(c == check and resource in ("*", r) for c, r in found)
    )
    assert not stale, f"accepted findings that no longer occur (drop them): {stale}"
