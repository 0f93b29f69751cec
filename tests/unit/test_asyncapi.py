"""The committed AsyncAPI document is what the code generates, and it maps exactly the channel table."""

from __future__ import annotations

import runpy
from pathlib import Path

import yaml

from tidepool_contracts.channels import BUCKETS, CHANNELS, STREAMS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "asyncapi.py"


def generate() -> str:
    return runpy.run_path(str(SCRIPT))["document"]()


def test_committed_document_is_not_stale() -> None:
    committed = (SCRIPT.parents[1] / "docs" / "asyncapi" / "asyncapi.yaml").read_text()
    assert committed == generate(), "docs/asyncapi/asyncapi.yaml is stale: run `python scripts/asyncapi.py`"


def test_document_lists_every_stream_subject_and_bucket_in_use_and_only_those() -> None:
    document = yaml.safe_load(generate())
    addresses = {channel["address"] for channel in document["channels"].values()}
    # Publishers use the subject templates, JetStream consumers the filters (or, for a runner, its template).
    declared = {channel.subject for channel in CHANNELS} | {channel.filter for channel in CHANNELS}
    assert addresses <= declared, addresses - declared
    for channel in CHANNELS:
        assert channel.subject in addresses, f"{channel.subject} has no publisher in any service"
        assert any(address in (channel.subject, channel.filter) for address in addresses)
    assert [stream["name"] for stream in document["x-tidepool-streams"]] == [s.name for s in STREAMS]
    assert [bucket["name"] for bucket in document["x-tidepool-kv-buckets"]] == [b.name for b in BUCKETS]
    subscribed = {channel["address"] for name, channel in document["channels"].items() if " <- " in name}
    consumed = {channel.subject for channel in CHANNELS if {channel.subject, channel.filter} & subscribed}
    # Every channel someone publishes on is consumed by some service (the build log by the API, the sandbox
    # samples by the telemetry service, a sandbox's flow log by the API, per request).
    per_request = {
        "tidepool.buildlog.{image}",
        "tidepool.metrics.sandbox.{sandbox_id}",
        "tidepool.flow.sandbox.{sandbox_id}",
    }
    assert consumed | per_request == {channel.subject for channel in CHANNELS}
