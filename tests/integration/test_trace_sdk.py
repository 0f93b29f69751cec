"""One SDK create() is one trace across api -> scheduler -> runner (spans collected in memory over OTLP)."""

from __future__ import annotations

import pytest
from daytona import Daytona

from tests.integration.spans import SpanCollector
from tests.integration.stackthread import StackThread
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("sdk_env")]


def test_one_create_is_one_trace_across_api_scheduler_and_runner(
    stack: StackThread, spans: SpanCollector
) -> None:
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        # Services export in batches (every few seconds): poll until the runner's part of the trace arrives.
        wanted = {"tidepool-api", "tidepool-scheduler", "tidepool-runner"}

        def services_of_the_create_trace() -> set[str]:
            collected = spans.snapshot()
            roots = [
                span
                for span in collected
                if span.name == "sandbox.create" and span.attributes.get("sandbox.id") == sandbox.id
            ]
            if not roots:
                return set()
            assert len({span.trace_id for span in roots}) == 1
            trace_id = roots[0].trace_id
            return {span.service for span in collected if span.trace_id == trace_id}

        wait_until(
            lambda: wanted <= services_of_the_create_trace(),
            lambda: f"the create's trace spans only {services_of_the_create_trace()}",
            timeout=60,
        )
    finally:
        daytona.delete(sandbox)


def test_one_toolbox_call_is_one_trace_across_proxy_runner_and_daemon(
    stack: StackThread, spans: SpanCollector
) -> None:
    """The proxy's span goes to the runner as `traceparent`, the runner's to the daemon; the daemon reports
    its handling time back and the runner records it as a `tidepool-daemon` span (sandboxes export none)."""
    daytona = Daytona()
    sandbox = daytona.create()
    try:
        assert sandbox.process.exec("echo traced").result.strip() == "traced"

        def services_of_the_exec_trace() -> set[str]:
            collected = spans.snapshot()
            proxy_spans = {
                span.trace_id
                for span in collected
                if span.service == "tidepool-proxy"
                and span.attributes.get("sandbox.id") == sandbox.id
                and any(
                    other.trace_id == span.trace_id and other.name == "daemon /process/execute"
                    for other in collected
                )
            }
            return {span.service for span in collected if span.trace_id in proxy_spans}

        wait_until(
            lambda: {"tidepool-proxy", "tidepool-runner", "tidepool-daemon"} <= services_of_the_exec_trace(),
            lambda: f"the exec's trace spans only {services_of_the_exec_trace()}",
            timeout=60,
        )
    finally:
        daytona.delete(sandbox)
