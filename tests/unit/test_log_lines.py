"""JSON logs (TIDEPOOL_LOG_JSON): every line one JSON object, structlog's and the standard library's alike,
with the current span's trace id (issue #14, "Operations")."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from typing import Any

SCRIPT = textwrap.dedent(
    """
    import logging
    import structlog
    from opentelemetry import trace
    from tidepool_runtime.observability import configure_logging, configure_tracing

    configure_logging("probe", "INFO", json_output=True)
    configure_tracing("probe", "")
    log = structlog.get_logger()
    log.info("outside.span")
    with trace.get_tracer("probe").start_as_current_span("work") as span:
        log.info("inside.span", sandbox_id="s-1")
        logging.getLogger("uvicorn.error").warning("library line %s", 7)
        context = span.get_span_context()
        print(format(context.trace_id, "032x"), format(context.span_id, "016x"))
    logging.getLogger("nats").error("library line outside")
    """
)


def test_every_line_is_json_with_the_trace_id_inside_a_span() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    trace_id, span_id = result.stdout.split()
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    by_event = {line["event"]: line for line in lines}
    assert set(by_event) == {"outside.span", "inside.span", "library line 7", "library line outside"}
    assert all(line["service"] == "probe" and "timestamp" in line and "level" in line for line in lines)
    for name in ("inside.span", "library line 7"):
        assert by_event[name]["trace_id"] == trace_id
        assert by_event[name]["span_id"] == span_id
    for name in ("outside.span", "library line outside"):
        assert "trace_id" not in by_event[name]
    assert by_event["library line 7"]["logger"] == "uvicorn.error"
    assert by_event["library line 7"]["level"] == "warning"
    assert by_event["inside.span"]["sandbox_id"] == "s-1"


def test_an_empty_pull_fetch_is_not_logged_as_an_error_and_other_failures_are() -> None:
    from tidepool_runtime.observability import QuietEmptyFetches

    def _fetch_n() -> None:  # named as nats-py's, where the plain TimeoutError comes from
        raise TimeoutError

    def elsewhere() -> None:
        raise TimeoutError

    def record_of(
        function: Any, message: str = "Task-10 raised an exception, retrying..."
    ) -> logging.LogRecord:
        try:
            function()
        except TimeoutError:
            info = sys.exc_info()
        return logging.LogRecord("faststream", logging.ERROR, __file__, 1, message, None, info)

    quiet = QuietEmptyFetches()
    assert not quiet.filter(record_of(_fetch_n))
    assert quiet.filter(record_of(elsewhere))
    assert quiet.filter(record_of(_fetch_n, "Task-10 raised an exception and won't be restarted."))
