"""The sandbox state machine: one table of allowed transitions, checked on every write."""

from __future__ import annotations

from enum import StrEnum


class SandboxState(StrEnum):
    UNKNOWN = "unknown"
    CREATING = "creating"
    PENDING_BUILD = "pending_build"
    BUILDING_SNAPSHOT = "building_snapshot"
    PULLING_SNAPSHOT = "pulling_snapshot"
    BUILD_FAILED = "build_failed"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ARCHIVING = "archiving"
    ARCHIVED = "archived"
    RESTORING = "restoring"
    RESIZING = "resizing"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    ERROR = "error"


class DesiredState(StrEnum):
    STARTED = "started"
    STOPPED = "stopped"
    DESTROYED = "destroyed"
    ARCHIVED = "archived"


S = SandboxState

# Every state may also "transition" to itself: events are redelivered, so applying one twice is a no-op.
ALLOWED_TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    S.UNKNOWN: frozenset({S.CREATING, S.PENDING_BUILD, S.ERROR, S.DESTROYING, S.DESTROYED}),
    S.PENDING_BUILD: frozenset(
        {S.BUILDING_SNAPSHOT, S.CREATING, S.STARTING, S.STARTED, S.BUILD_FAILED, S.ERROR, S.DESTROYING}
    ),
    S.BUILDING_SNAPSHOT: frozenset(
        {S.CREATING, S.STARTING, S.STARTED, S.BUILD_FAILED, S.ERROR, S.DESTROYING}
    ),
    S.PULLING_SNAPSHOT: frozenset({S.CREATING, S.STARTING, S.STARTED, S.ERROR, S.DESTROYING}),
    S.CREATING: frozenset({S.PULLING_SNAPSHOT, S.STARTING, S.STARTED, S.ERROR, S.DESTROYING}),
    S.STARTING: frozenset({S.STARTED, S.STOPPED, S.ERROR, S.DESTROYING}),
    S.STARTED: frozenset({S.STOPPING, S.STOPPED, S.RESIZING, S.ERROR, S.DESTROYING}),
    S.STOPPING: frozenset({S.STOPPED, S.STARTED, S.ERROR, S.DESTROYING}),
    S.STOPPED: frozenset({S.STARTING, S.STARTED, S.ARCHIVING, S.ERROR, S.DESTROYING}),
    S.RESIZING: frozenset({S.STARTED, S.STOPPED, S.ERROR, S.DESTROYING}),
    S.ARCHIVING: frozenset({S.ARCHIVED, S.STOPPED, S.ERROR, S.DESTROYING}),
    S.ARCHIVED: frozenset({S.RESTORING, S.STARTING, S.DESTROYING, S.DESTROYED}),
    S.RESTORING: frozenset({S.STARTED, S.ERROR, S.DESTROYING}),
    # A runner may report a sandbox alive again after an error (e.g. it recovered after a restart).
    S.ERROR: frozenset({S.STARTING, S.STARTED, S.STOPPING, S.STOPPED, S.DESTROYING, S.DESTROYED}),
    S.BUILD_FAILED: frozenset({S.PENDING_BUILD, S.DESTROYING, S.DESTROYED}),
    S.DESTROYING: frozenset({S.DESTROYED, S.ERROR}),
    S.DESTROYED: frozenset(),
}

# States from which the SDK stops waiting with an error.
FAILED_STATES: frozenset[SandboxState] = frozenset({S.ERROR, S.BUILD_FAILED})
# States where the sandbox no longer has (or is losing) a container.
GONE_STATES: frozenset[SandboxState] = frozenset({S.DESTROYING, S.DESTROYED})

# Usage accounting (Daytona's, design digest §7), shared by the API's quotas and the telemetry service's
# organization metrics so the two never disagree: cpu and memory are held in the compute states, disk in
# those and where the filesystem is kept (stopped, archiving); archived, failed and destroyed hold nothing.
COMPUTE_STATES: frozenset[SandboxState] = frozenset(
    {
        S.UNKNOWN,
        S.CREATING,
        S.PENDING_BUILD,
        S.BUILDING_SNAPSHOT,
        S.PULLING_SNAPSHOT,
        S.STARTING,
        S.STARTED,
        S.STOPPING,
        S.RESTORING,
        S.RESIZING,  # only a started sandbox resizes (STARTED -> RESIZING): it keeps its compute meanwhile
    }
)
DISK_STATES: frozenset[SandboxState] = COMPUTE_STATES | {S.STOPPED, S.ARCHIVING}


class InvalidTransitionError(ValueError):
    def __init__(self, current: SandboxState, target: SandboxState) -> None:
        super().__init__(f"sandbox cannot go from state '{current}' to '{target}'")
        self.current = current
        self.target = target


def can_transition(current: SandboxState, target: SandboxState) -> bool:
    return current == target or target in ALLOWED_TRANSITIONS[current]


def assert_transition(current: SandboxState, target: SandboxState) -> None:
    if not can_transition(current, target):
        raise InvalidTransitionError(current, target)
