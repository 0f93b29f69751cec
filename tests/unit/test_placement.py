"""Runner choice for new sandboxes: room, freshness, and the capabilities the sandbox needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tidepool_contracts.models import (
    Capability,
    IsolationKind,
    RunnerCapabilities,
    RunnerInfo,
    SandboxAction,
    SandboxSpec,
    VolumeMountSpec,
    required_capabilities,
)
from tidepool_scheduler.placement import (
    CORDONED_REASON,
    NO_CAPACITY_REASON,
    choose_runner,
    no_runner_reason,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = SandboxSpec(sandbox_id="s", organization_id="o", image="i", cpu=1, memory_gib=1)


def runner(runner_id: str, **changes: object) -> RunnerInfo:
    values: dict[str, object] = {
        "runner_id": runner_id,
        "url": f"http://{runner_id}",
        "cpu_total": 4,
        "memory_total_gib": 8,
        "heartbeat_at": NOW,
    }
    values.update(changes)
    return RunnerInfo.model_validate(values)


def test_prefers_the_emptier_runner() -> None:
    busy = runner("busy", cpu_allocated=12, memory_allocated_gib=12)
    idle = runner("idle")
    assert choose_runner([busy, idle], SPEC, NOW) == idle


def test_skips_stale_and_unschedulable_runners() -> None:
    stale = runner("stale", heartbeat_at=NOW - timedelta(minutes=5))
    cordoned = runner("cordoned", unschedulable=True)
    assert choose_runner([stale, cordoned], SPEC, NOW) is None


def test_skips_runners_the_admin_cordoned_and_those_silent_longer_than_the_loss_time() -> None:
    first, second = runner("first"), runner("second", cpu_allocated=2)
    assert choose_runner([first, second], SPEC, NOW, cordoned=frozenset({"first"})) == second
    assert choose_runner([first, second], SPEC, NOW, cordoned=frozenset({"first", "second"})) is None
    assert no_runner_reason([first], SPEC, NOW, cordoned=frozenset({"first"})) == CORDONED_REASON
    quiet = runner("quiet", heartbeat_at=NOW - timedelta(seconds=8))
    assert choose_runner([quiet], SPEC, NOW, freshness=timedelta(seconds=10)) == quiet
    assert choose_runner([quiet], SPEC, NOW, freshness=timedelta(seconds=5)) is None


def test_refuses_a_runner_without_room() -> None:
    full = runner("full", cpu_allocated=16)
    assert choose_runner([full], SPEC, NOW) is None


POD_WITHOUT_POLICIES = RunnerCapabilities(
    isolation=IsolationKind.POD, network_policies=False, domain_allow_lists=False, live_resize=False
)


def test_a_heartbeat_without_capabilities_reads_as_a_container_engine_runner() -> None:
    old = RunnerInfo.model_validate_json(
        '{"runner_id": "old", "url": "http://old", "cpu_total": 4, "memory_total_gib": 8}'
    )
    assert old.capabilities == RunnerCapabilities()
    assert old.capabilities.isolation is IsolationKind.CONTAINER
    assert not old.capabilities.unmet(required_capabilities(SPEC.model_copy(update={"volumes": []})))


def test_a_sandbox_with_a_network_policy_goes_only_where_policies_are_enforced() -> None:
    roomy_pod = runner("pod", capabilities=POD_WITHOUT_POLICIES)
    busy_container = runner("container", cpu_allocated=12, memory_allocated_gib=12)
    # Without a policy the emptier runner wins, whatever its isolation.
    assert choose_runner([roomy_pod, busy_container], SPEC, NOW) == roomy_pod
    for policy in ({"network_block_all": True}, {"network_allow_list": ["10.0.0.0/8"]}):
        restricted = SPEC.model_copy(update=policy)
        assert choose_runner([roomy_pod, busy_container], restricted, NOW) == busy_container
    domains = SPEC.model_copy(update={"domain_allow_list": ["pypi.org"]})
    no_domains = runner("no-domains", capabilities=RunnerCapabilities(domain_allow_lists=False))
    assert choose_runner([no_domains, busy_container], domains, NOW) == busy_container


def test_capability_mismatch_means_no_runner_and_says_which() -> None:
    pod = runner("pod", capabilities=POD_WITHOUT_POLICIES)
    blocked = SPEC.model_copy(update={"network_block_all": True})
    assert choose_runner([pod], blocked, NOW) is None
    assert (
        no_runner_reason([pod], blocked, NOW)
        == "no runner supports what the sandbox needs (network_policies)"
    )
    # A job that needs live resize is not placed on a runner without it either.
    assert choose_runner([pod], SPEC, NOW, action=SandboxAction.RESIZE) is None
    assert choose_runner([pod], SPEC, NOW, action=SandboxAction.START) == pod
    # Lack of room stays the reason it always was.
    assert no_runner_reason([runner("full", cpu_allocated=16)], SPEC, NOW) == NO_CAPACITY_REASON


def test_required_capabilities_follow_the_spec_and_the_job() -> None:
    assert required_capabilities(SPEC) == frozenset()
    volume = VolumeMountSpec(volume_id="v", mount_path="/data", key_prefix="volumes/v")
    assert required_capabilities(SPEC.model_copy(update={"volumes": [volume]})) == {Capability.VOLUMES}
    # Block-all wins over a domain list (as in Daytona): domains are then not needed.
    both = SPEC.model_copy(update={"network_block_all": True, "domain_allow_list": ["pypi.org"]})
    assert required_capabilities(both) == {Capability.NETWORK_POLICIES}
    assert required_capabilities(SPEC, SandboxAction.ARCHIVE) == {Capability.ARCHIVE}
    assert required_capabilities(SPEC, SandboxAction.SNAPSHOT) == {Capability.SNAPSHOTS}
    gpu_less = RunnerCapabilities()
    assert gpu_less.unmet(frozenset({Capability.GPU, Capability.VOLUMES})) == [Capability.GPU]
