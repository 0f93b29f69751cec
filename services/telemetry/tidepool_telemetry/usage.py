"""What each organization's sandboxes use, folded from the event stream (state) and KV `DESIRED` (size).

Counted as the API's quotas count (`tidepool_contracts.states.COMPUTE_STATES` / `DISK_STATES`, Daytona's
usage accounting, design digest §7): cpu and memory in the states where a sandbox holds compute, disk in
those and where it still holds its filesystem (stopped, archiving); archived, failed or destroyed: nothing.

Thread-safe: the bus handlers write on the event loop, the metric readers read from their own threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tidepool_contracts.models import DesiredSandbox, SandboxStateEvent
from tidepool_contracts.states import COMPUTE_STATES, DISK_STATES, SandboxState


@dataclass(frozen=True)
class Usage:
    """Cores, GiB of memory, GiB of disk."""

    cpu: float = 0.0
    memory_gib: float = 0.0
    disk_gib: float = 0.0


class OrganizationUsage:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, tuple[str, SandboxState]] = {}  # sandbox id -> (organization, state)
        self._sizes: dict[str, Usage] = {}  # sandbox id -> its cpu, memory, disk

    def apply_state(self, event: SandboxStateEvent) -> None:
        with self._lock:
            if event.state == SandboxState.DESTROYED:
                self._states.pop(event.sandbox_id, None)
                self._sizes.pop(event.sandbox_id, None)
            else:
                self._states[event.sandbox_id] = (event.organization_id, event.state)

    def apply_desired(self, desired: DesiredSandbox | None) -> None:
        """A sandbox's size (a resize rewrites it). A deleted record is ignored: the size stays known until
        the sandbox's `destroyed` event, which may come later."""
        if desired is None:
            return
        spec = desired.spec
        with self._lock:
            self._sizes[desired.sandbox_id] = Usage(spec.cpu, spec.memory_gib, spec.disk_gib)

    def used(self, organization_id: str) -> Usage:
        """What `organization_id`'s sandboxes use now (a sandbox of unknown size counts as nothing)."""
        cpu = memory = disk = 0.0
        with self._lock:
            for sandbox_id, (organization, state) in self._states.items():
                size = self._sizes.get(sandbox_id)
                if organization != organization_id or size is None:
                    continue
                if state in COMPUTE_STATES:
                    cpu += size.cpu
                    memory += size.memory_gib
                if state in DISK_STATES:
                    disk += size.disk_gib
        return Usage(cpu, memory, disk)
