"""Owners of claimed warm-pool sandboxes, kept by the runner.

A warm-pool sandbox's container is created for no organization, and the engine cannot relabel a container:
its `tidepool.organization` label stays the pool's. The claim's owner is written here (one small file per
sandbox under the runner's data directory, so it survives a runner restart) and `ContainerEngine` reports
it instead of the label, so route adoption, daemon-health and process events name the right organization.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class ClaimedOwners:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._owners: dict[str, str] = {}
        if directory.is_dir():
            for entry in directory.iterdir():
                with contextlib.suppress(OSError):
                    self._owners[entry.name] = entry.read_text().strip()

    def record(self, sandbox_id: str, organization_id: str) -> None:
        """Remember (durably, atomically) that `sandbox_id` now belongs to `organization_id`."""
        if self._owners.get(sandbox_id) == organization_id:
            return
        self._directory.mkdir(parents=True, exist_ok=True)
        staging = self._directory / f".{sandbox_id}.tmp"
        staging.write_text(organization_id)
        os.replace(staging, self._directory / sandbox_id)
        self._owners[sandbox_id] = organization_id

    def forget(self, sandbox_id: str) -> None:
        self._owners.pop(sandbox_id, None)
        (self._directory / sandbox_id).unlink(missing_ok=True)

    def owner(self, sandbox_id: str, labelled: str) -> str:
        """The organization `sandbox_id` belongs to: the claimer's if it was claimed, else its label's."""
        return self._owners.get(sandbox_id, labelled)
