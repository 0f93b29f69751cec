"""The bus-init Job of deploy/k8s: creates every stream and KV bucket of the channel table with
`--replicas` JetStream replicas (3 on the NATS cluster), and raises the replica count of any that a service
created first with one.

`python -m tidepool_stack.bus_init --replicas 3`, logged in as the NATS user `bus_init`
(TIDEPOOL_NATS_USER / TIDEPOOL_NATS_PASSWORD, Secret tidepool-nats-bus-init), whose only rights are to
create, inspect and update streams (tidepool_stack.k8s_nats). Idempotent: a re-run changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tidepool_contracts.channels import BUCKETS
from tidepool_runtime import nats_auth
from tidepool_runtime.broker import create_broker, declare_topology
from tidepool_runtime.settings import CommonSettings


async def init_bus(settings: CommonSettings, replicas: int) -> None:
    broker = create_broker(
        settings.nats_url,
        "bus-init",
        user=settings.nats_user,
        password=settings.nats_password,
        ca_file=settings.nats_ca_file,
    )
    await broker.connect()
    try:
        await declare_topology(broker, replicas=replicas)
        js = broker.config.connection_state.stream
        for bucket in BUCKETS:
            info = await js.stream_info(nats_auth.kv_stream(bucket))
            if (info.config.num_replicas or 1) < replicas:
                info.config.num_replicas = replicas
                await js.update_stream(config=info.config)
    finally:
        await broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3, help="JetStream replicas (1 to 5)")
    args = parser.parse_args(argv)
    asyncio.run(init_bus(CommonSettings(), args.replicas))
    return 0


if __name__ == "__main__":
    sys.exit(main())
