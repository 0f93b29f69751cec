"""The builder's job subscriber in FastStream's in-memory TestNatsBroker (no server), with a fake engine."""

from __future__ import annotations

from typing import Any

from faststream.nats import TestNatsBroker

from tidepool_builder import subscribers
from tidepool_builder.builds import Builder
from tidepool_contracts import channels
from tidepool_contracts.models import BuildJob
from tidepool_runtime.broker import Bus, create_broker, declare_publishers
from tidepool_runtime.settings import Settings


class FakeImages:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def delete(self, name: str, force: bool = False) -> None:
        self.deleted.append(name)


class FakeDocker:
    def __init__(self) -> None:
        self.images = FakeImages()


async def test_an_eviction_job_removes_the_build_and_its_registry_copy() -> None:
    broker = create_broker("nats://unused:4222", "test")
    docker: Any = FakeDocker()
    builder = Builder(Settings(), Bus(broker), docker)
    builder.bus.add_publishers(subscribers.register(broker, builder))
    api = Bus(broker, declare_publishers(broker, channels.BUILD_JOBS, service="api"))
    evict = BuildJob(
        snapshot_name="s",
        image_ref="localhost/tidepool/build/o:abc",
        dockerfile="",
        remove=True,
        registry_ref="registry:5000/tidepool/build/o:abc",
    )
    async with TestNatsBroker(broker):
        await api.publish(channels.BUILD_JOBS, evict, msg_id="evict:s")
    assert docker.images.deleted == ["localhost/tidepool/build/o:abc", "registry:5000/tidepool/build/o:abc"]
