"""Logging and tracing set-up shared by every service."""

from __future__ import annotations

import logging
import sys
import traceback

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def add_trace_context(
    _logger: object, _method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """`trace_id` (32 hex) and `span_id` (16 hex) of the current OpenTelemetry span, when there is one: a log
    line is found from a trace and the other way round (feature inventory "OpenTelemetry")."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


class QuietEmptyFetches(logging.Filter):
    """Drops FastStream's "Task-N raised an exception, retrying" error for a pull fetch that found no message.

    nats-py (2.x) raises a plain `asyncio.TimeoutError` when a pull request expires empty, which FastStream
    0.7.8 does not count as "no messages" (it suppresses `nats.errors.TimeoutError` only): its supervisor
    restarts the consume loop, which is right, and logs an error with a traceback, which made every start
    of the platform look broken. Any other exception of a consume loop is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[1] is None:
            return True
        error = record.exc_info[1]
        if type(error) is not TimeoutError or "raised an exception, retrying" not in str(record.msg):
            return True
        frames = traceback.extract_tb(error.__traceback__)
        return not any(frame.name == "_fetch_n" for frame in frames)


def configure_logging(service: str, level: str = "INFO", json_output: bool = False) -> None:
    """One line per event, tagged with the service name, so `make up` can show all services in one stream.

    `json_output` (TIDEPOOL_LOG_JSON): every line is one JSON object, including those of libraries that log
    through the standard library (uvicorn, FastStream, nats), with `trace_id`/`span_id` when in a span."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if json_output else "%H:%M:%S", utc=json_output),
        add_trace_context,
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.addFilter(QuietEmptyFetches())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def serve_prometheus_metrics(service: str, host: str, port: int) -> None:
    """`GET http://{host}:{port}/metrics` in Prometheus' text format, from a daemon thread: the process's own
    metrics (CPU, memory, open fds, GC) and every OpenTelemetry metric recorded through the global
    MeterProvider, which this sets (FastStream's `messaging.*` metrics of the bus, among others)."""
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    resource = Resource.create({"service.name": f"tidepool-{service}"})
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()], resource=resource)
    metrics.set_meter_provider(provider)
    # 1 while the service runs: every service has a metric of its own (and so a `target_info` naming it),
    # even one that sends nothing on the bus.
    provider.get_meter("tidepool").create_observable_gauge(
        "tidepool.service.up", callbacks=[lambda _options: [metrics.Observation(1)]], description="1: running"
    )
    start_http_server(port, addr=host)


_otlp_endpoint: str | None = None  # None: tracing off (configure_tracing(enabled=False) or never called)


def _provider(service: str, otlp_endpoint: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"tidepool-{service}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_endpoint}/v1/traces"))
        )
    return provider


def configure_tracing(service: str, otlp_endpoint: str, enabled: bool = True) -> None:
    """Always record trace context (so it propagates through message headers); export only when configured.

    `enabled` False (TIDEPOOL_TRACING_ENABLED=false): no tracer provider at all, so spans are no-ops and no
    trace context travels (what `make bench` compares against)."""
    global _otlp_endpoint
    if not enabled:
        return
    _otlp_endpoint = otlp_endpoint
    trace.set_tracer_provider(_provider(service, otlp_endpoint))


_foreign: dict[str, trace.Tracer] = {}


def tracer_on_behalf_of(service: str) -> trace.Tracer:
    """A tracer whose spans carry `service.name = tidepool-{service}`, for a part that cannot export its own
    (the sandbox daemon: the runner records its spans from the timing it reports). A no-op tracer while
    tracing is off."""
    if _otlp_endpoint is None:
        return trace.NoOpTracer()
    if service not in _foreign:
        _foreign[service] = _provider(service, _otlp_endpoint).get_tracer(f"tidepool.{service}")
    return _foreign[service]
