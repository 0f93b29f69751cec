"""Sandbox counts per organization and state, folded from the event stream."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tidepool_contracts.models import SandboxStateEvent
from tidepool_contracts.states import SandboxState


@dataclass
class SandboxCounts:
    """Latest known state of every sandbox; destroyed ones are forgotten."""

    _latest: dict[str, tuple[str, SandboxState]] = field(default_factory=dict)

    def apply(self, event: SandboxStateEvent) -> None:
        if event.state == SandboxState.DESTROYED:
            self._latest.pop(event.sandbox_id, None)
            return
        self._latest[event.sandbox_id] = (event.organization_id, event.state)

    def by_organization_and_state(self) -> Counter[tuple[str, str]]:
        return Counter((organization, state.value) for organization, state in self._latest.values())
