"""Sandbox resource samples: kept in the `TIDEPOOL_SANDBOX_METRICS` stream (one subject per sandbox,
`max_age` = the retention setting, Daytona's 3 days by default), read back per query as Daytona's series.

No copy in memory or a database: JetStream holds them, survives a telemetry restart, and drops them when
they age out. A query reads one sandbox's subject from `start` with a short-lived pull consumer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tidepool_contracts import channels
from tidepool_contracts.models import (
    MetricPoint,
    MetricSeriesData,
    SandboxMetricsQuery,
    SandboxMetricsReply,
    SandboxMetricsSample,
)
from tidepool_runtime.broker import Bus, decode, stream_config

# Daytona's metric names (feature inventory §10) -> the sample's field.
METRIC_FIELDS: dict[str, str] = {
    "daytona.sandbox.cpu.utilization": "cpu_utilization",
    "daytona.sandbox.cpu.limit": "cpu_limit",
    "daytona.sandbox.memory.usage": "memory_usage",
    "daytona.sandbox.memory.limit": "memory_limit",
    "daytona.sandbox.memory.cache": "memory_cache",
    "daytona.sandbox.memory.utilization": "",  # derived: usage / limit
    "daytona.sandbox.filesystem.usage": "filesystem_usage",
    "daytona.sandbox.filesystem.total": "filesystem_total",
    "daytona.sandbox.filesystem.available": "",  # derived: total - usage
    "daytona.sandbox.filesystem.utilization": "",  # derived: usage / total
    "daytona.sandbox.network.receive": "network_rx_bytes",
    "daytona.sandbox.network.transmit": "network_tx_bytes",
}
FETCH_BATCH = 1000
FETCH_TIMEOUT_SECONDS = 2.0
# A reply stays far below NATS's 1 MiB message limit: longer ranges are averaged down to this many points
# (3 days at one sample per 10 s are 25,920 samples).
MAX_POINTS = 300
# Gauges averaged over a bucket; the other fields (limits, totals, counters) take the bucket's last value.
AVERAGED = ("cpu_utilization", "memory_usage", "memory_cache", "filesystem_usage")


async def apply_retention(bus: Bus, seconds: float) -> None:
    """Set the samples stream's max_age to `seconds` (the telemetry service tunes this stream)."""
    config = replace(stream_config(channels.SANDBOX_METRICS_SAMPLES), max_age=seconds)
    await bus.jetstream.update_stream(config=config)


async def read_samples(
    bus: Bus, sandbox_id: str, start: datetime, end: datetime
) -> list[SandboxMetricsSample]:
    """One sandbox's samples with `start <= sampled_at <= end`, oldest first."""
    stream = channels.SANDBOX_METRICS_SAMPLES.name
    subject = channels.SANDBOX_METRICS.address(sandbox_id=sandbox_id)
    js = bus.jetstream
    info = await js.stream_info(stream, subjects_filter=subject)
    if not (info.state.subjects or {}).get(subject):
        return []
    subscription = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=start.isoformat(),
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    samples: list[SandboxMetricsSample] = []
    try:
        if (await subscription.consumer_info()).num_pending == 0:
            return []
        while True:
            messages = await subscription.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_SECONDS)
            for message in messages:
                sample = decode(SandboxMetricsSample, message.data)
                if sample.sampled_at > end:
                    return samples
                if sample.sampled_at >= start:
                    samples.append(sample)
            if not messages or messages[-1].metadata.num_pending == 0:
                return samples
    finally:
        await subscription.unsubscribe()


def metric_value(sample: SandboxMetricsSample, name: str) -> float | None:
    field = METRIC_FIELDS[name]
    if field:
        value = getattr(sample, field)
        return None if value is None else float(value)
    if name == "daytona.sandbox.memory.utilization":
        if sample.memory_usage is not None and sample.memory_limit:
            return 100.0 * sample.memory_usage / sample.memory_limit
        return None
    if sample.filesystem_usage is None or not sample.filesystem_total:
        return None
    if name == "daytona.sandbox.filesystem.available":
        return float(sample.filesystem_total - sample.filesystem_usage)
    return 100.0 * sample.filesystem_usage / sample.filesystem_total


def series(samples: list[SandboxMetricsSample], names: list[str]) -> SandboxMetricsReply:
    """Daytona's series: one per known metric name asked for (all when `names` is empty) that has points;
    every metric of one sample carries that sample's timestamp, so the SDK pivots them into one row."""
    wanted = [name for name in (names or list(METRIC_FIELDS)) if name in METRIC_FIELDS]

    def points(name: str) -> Iterator[MetricPoint]:
        for sample in samples:
            value = metric_value(sample, name)
            if value is not None:
                yield MetricPoint(timestamp=sample.sampled_at, value=value)

    result = [MetricSeriesData(metric_name=name, points=list(points(name))) for name in dict.fromkeys(wanted)]
    return SandboxMetricsReply(series=[one for one in result if one.points])


def downsample(
    samples: list[SandboxMetricsSample], max_points: int = MAX_POINTS
) -> list[SandboxMetricsSample]:
    """At most `max_points` samples: consecutive runs of samples merged into one (timestamp of the run's
    last; gauges averaged over the samples that have them, everything else the run's last value)."""
    if len(samples) <= max_points:
        return samples
    size = -(-len(samples) // max_points)
    merged: list[SandboxMetricsSample] = []
    for index in range(0, len(samples), size):
        run = samples[index : index + size]
        averages: dict[str, float | int | None] = {}
        for field in AVERAGED:
            values = [value for value in (getattr(sample, field) for sample in run) if value is not None]
            mean = sum(values) / len(values) if values else None
            averages[field] = mean if field == "cpu_utilization" or mean is None else round(mean)
        merged.append(run[-1].model_copy(update=averages))
    return merged


async def answer(bus: Bus, query: SandboxMetricsQuery) -> SandboxMetricsReply:
    samples = await read_samples(bus, query.sandbox_id, query.start, query.end)
    return series(downsample(samples), query.metric_names)
