"""The lifecycle timers' decision (`due`) for every interval meaning of the behaviour spec."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tidepool_contracts.models import DesiredSandbox, SandboxRoute, SandboxSpec
from tidepool_contracts.states import DesiredState, SandboxState
from tidepool_scheduler.lifecycle import AUTO_ARCHIVE, AUTO_DELETE, AUTO_STOP, due

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
MINUTE = 60.0


def desired(state: DesiredState, stop: int = 15, delete: int = -1, at: datetime = T0) -> DesiredSandbox:
    spec = SandboxSpec(sandbox_id="s", organization_id="o", image="i")
    return DesiredSandbox(
        sandbox_id="s", organization_id="o", desired_state=state, spec=spec, intent_id="i",
        updated_at=at, auto_stop_interval=stop, auto_delete_interval=delete,
    )  # fmt: skip


def route(state: SandboxState, at: datetime = T0) -> SandboxRoute:
    return SandboxRoute(
        sandbox_id="s", organization_id="o", runner_id="r", runner_url="u", state=state, updated_at=at
    )


def test_auto_stop_after_the_idle_interval_only() -> None:
    started, running = desired(DesiredState.STARTED, stop=15), route(SandboxState.STARTED)
    assert due(started, running, None, T0 + timedelta(minutes=14, seconds=59), MINUTE) is None
    assert due(started, running, None, T0 + timedelta(minutes=15), MINUTE) == AUTO_STOP
    # Toolbox use restarts the count; so does a state change or a new desired record.
    used = T0 + timedelta(minutes=10)
    assert due(started, running, used, T0 + timedelta(minutes=20), MINUTE) is None
    assert due(started, running, used, T0 + timedelta(minutes=25), MINUTE) == AUTO_STOP
    assert due(started, route(SandboxState.STARTED, used), None, T0 + timedelta(minutes=20), MINUTE) is None
    # 0 disables it; a sandbox not started (or not wanted started) is left alone.
    assert due(desired(DesiredState.STARTED, stop=0), running, None, T0 + timedelta(days=30), MINUTE) is None
    assert due(started, route(SandboxState.STOPPING), None, T0 + timedelta(hours=1), MINUTE) is None
    assert due(desired(DesiredState.STOPPED), running, None, T0 + timedelta(hours=1), MINUTE) is None


def test_auto_delete_after_stopping_minus_one_never_zero_at_once() -> None:
    stopped = route(SandboxState.STOPPED)
    never = desired(DesiredState.STOPPED, delete=-1)
    assert due(never, stopped, None, T0 + timedelta(days=365), MINUTE) is None
    ephemeral = desired(DesiredState.STOPPED, delete=0)
    assert due(ephemeral, stopped, None, T0, MINUTE) == AUTO_DELETE
    later = desired(DesiredState.STOPPED, delete=30)
    assert due(later, stopped, None, T0 + timedelta(minutes=29), MINUTE) is None
    assert due(later, stopped, None, T0 + timedelta(minutes=30), MINUTE) == AUTO_DELETE
    # Only once it has stopped, and only if stopped is what it should be.
    assert due(ephemeral, route(SandboxState.STOPPING), None, T0 + timedelta(hours=1), MINUTE) is None
    assert due(desired(DesiredState.STARTED, stop=0, delete=0), stopped, None, T0, MINUTE) is None


def test_a_minute_can_be_shortened_for_tests() -> None:
    started, running = desired(DesiredState.STARTED, stop=2), route(SandboxState.STARTED)
    assert due(started, running, None, T0 + timedelta(seconds=1.9), 1.0) is None
    assert due(started, running, None, T0 + timedelta(seconds=2), 1.0) == AUTO_STOP


def test_auto_archive_after_stopped_for_its_interval_delete_first() -> None:
    stopped = route(SandboxState.STOPPED)
    week = desired(DesiredState.STOPPED).model_copy(update={"auto_archive_interval": 10080})
    assert due(week, stopped, None, T0 + timedelta(days=6, hours=23), MINUTE) is None
    assert due(week, stopped, None, T0 + timedelta(days=7), MINUTE) == AUTO_ARCHIVE
    # 0 on the bus: never (the API turns Daytona's 0 into the maximum before it gets here).
    never = desired(DesiredState.STOPPED).model_copy(update={"auto_archive_interval": 0})
    assert due(never, stopped, None, T0 + timedelta(days=365), MINUTE) is None
    # A due auto-delete wins; a started or archiving sandbox is left alone.
    both = desired(DesiredState.STOPPED, delete=5).model_copy(update={"auto_archive_interval": 5})
    assert due(both, stopped, None, T0 + timedelta(minutes=5), MINUTE) == AUTO_DELETE
    assert due(week, route(SandboxState.ARCHIVING), None, T0 + timedelta(days=8), MINUTE) is None
    running = desired(DesiredState.STARTED, stop=0).model_copy(update={"auto_archive_interval": 1})
    assert due(running, route(SandboxState.STARTED), None, T0 + timedelta(days=8), MINUTE) is None
