"""The AsyncAPI document of the whole bus, generated from the services' own subscribers and publishers.

`python scripts/asyncapi.py` rewrites docs/asyncapi/asyncapi.yaml; tests/unit/test_asyncapi.py fails when the
committed file differs from what this generates. Every service's `subscribers.register` runs against one
broker (never connected; the handlers' dependencies are placeholders, as no handler runs). Streams and KV
buckets, which AsyncAPI has no object for, are listed under `x-tidepool-streams` and `x-tidepool-kv-buckets`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import yaml
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from tidepool_api import subscribers as api
from tidepool_builder import subscribers as builder
from tidepool_contracts.channels import BUCKETS, STREAMS, stream_subjects
from tidepool_runner import subscribers as runner
from tidepool_scheduler import subscribers as scheduler
from tidepool_telemetry import subscribers as telemetry

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "asyncapi" / "asyncapi.yaml"
NO_DEPENDENCY: Any = cast(Any, None)


def platform_broker() -> NatsBroker:
    broker = NatsBroker("nats://127.0.0.1:4222")
    api.register(broker, NO_DEPENDENCY)
    scheduler.register(broker, NO_DEPENDENCY)
    runner.publishers(broker)
    runner.register_jobs(broker, "{runner_id}", NO_DEPENDENCY, 16)
    builder.register(broker, NO_DEPENDENCY)
    telemetry.register(broker, NO_DEPENDENCY, NO_DEPENDENCY)
    return broker


def document() -> str:
    specification = AsyncAPI(
        platform_broker(),
        title="Tidepool bus",
        version="1",
        description="Every stream, subject and KV bucket of the Tidepool bus (from scripts/asyncapi.py).",
    ).to_specification()
    data = specification.to_jsonable()
    data["x-tidepool-streams"] = [
        {
            "name": stream.name,
            "retention": stream.retention,
            "subjects": stream_subjects(stream),
            "maxAgeSeconds": stream.max_age,
            "duplicateWindowSeconds": stream.duplicate_window,
            "description": stream.description,
        }
        for stream in STREAMS
    ]
    schemas = data.setdefault("components", {}).setdefault("schemas", {})
    buckets = []
    for bucket in BUCKETS:
        schemas.setdefault(
            bucket.model.__name__, bucket.model.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        buckets.append(
            {
                "name": bucket.name,
                "key": bucket.key,
                "value": {"$ref": f"#/components/schemas/{bucket.model.__name__}"},
                "ttlSeconds": bucket.ttl,
                "description": bucket.description,
            }
        )
    data["x-tidepool-kv-buckets"] = buckets
    return yaml.safe_dump(data, sort_keys=True, allow_unicode=True, width=110)


def main() -> int:
    DOCUMENT.parent.mkdir(parents=True, exist_ok=True)
    DOCUMENT.write_text(document())
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
