"""One SDK create() is one trace across api -> scheduler -> runner (spans collected in memory over OTLP)."""

from __future__ import annotations

import time

import pytest
from daytona import Daytona

from tests.integration.spans import SpanCollector
from tests.integration.stackthread import StackThread

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


def test_one_create_is_one_trace_across_api_scheduler_and_runner(
    stack: StackThread, spans: SpanCollector
) -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        # Services export in batches (every few seconds): poll until the runner's part of the trace arrives.
        deadline = time.monotonic() + 60
        services: set[str] = set()
        while time.monotonic() < deadline:
            collected = spans.snapshot()
            roots = [
                span
                for span in collected
                if span.name == "sandbox.create" and span.attributes.get("sandbox.id") == sandbox.id
            ]
            if roots:
                assert len({span.trace_id for span in roots}) == 1
                trace_id = roots[0].trace_id
                services = {span.service for span in collected if span.trace_id == trace_id}
                if {"tidepool-api", "tidepool-scheduler", "tidepool-runner"} <= services:
                    break
            time.sleep(0.5)
        assert {"tidepool-api", "tidepool-scheduler", "tidepool-runner"} <= services, services
    finally:
        daytona.delete(sandbox)
