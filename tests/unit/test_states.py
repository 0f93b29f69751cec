"""The sandbox state machine table."""

from __future__ import annotations

import itertools

import pytest

from tidepool_contracts.states import (
    ALLOWED_TRANSITIONS,
    InvalidTransitionError,
    SandboxState,
    assert_transition,
    can_transition,
)


def test_every_state_has_a_row() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(SandboxState)


def test_lifecycle_path_is_allowed() -> None:
    path = [
        SandboxState.UNKNOWN,
        SandboxState.CREATING,
        SandboxState.STARTED,
        SandboxState.STOPPING,
        SandboxState.STOPPED,
        SandboxState.STARTING,
        SandboxState.STARTED,
        SandboxState.DESTROYING,
        SandboxState.DESTROYED,
    ]
    for current, target in itertools.pairwise(path):
        assert_transition(current, target)


def test_destroyed_is_final() -> None:
    for target in SandboxState:
        if target != SandboxState.DESTROYED:
            assert not can_transition(SandboxState.DESTROYED, target)


def test_stale_started_after_delete_is_rejected() -> None:
    with pytest.raises(InvalidTransitionError, match="destroying"):
        assert_transition(SandboxState.DESTROYING, SandboxState.STARTED)


def test_same_state_is_idempotent() -> None:
    for state in SandboxState:
        assert can_transition(state, state)


def test_transitions_only_name_known_states() -> None:
    for targets in ALLOWED_TRANSITIONS.values():
        assert targets <= set(SandboxState)


def test_runner_loss_paths() -> None:
    """A lost runner's sandboxes go to `error` from any state a runner holds them in
    (tidepool_scheduler.runner_loss), and come back to what their runner reports once it returns."""
    on_a_runner = (
        SandboxState.CREATING,
        SandboxState.PULLING_SNAPSHOT,
        SandboxState.STARTING,
        SandboxState.STARTED,
        SandboxState.STOPPING,
        SandboxState.STOPPED,
        SandboxState.RESIZING,
        SandboxState.ARCHIVING,
        SandboxState.RESTORING,
    )
    for state in on_a_runner:
        assert can_transition(state, SandboxState.ERROR), state
    for back in (SandboxState.STARTED, SandboxState.STOPPED, SandboxState.DESTROYING):
        assert can_transition(SandboxState.ERROR, back)
