"""Snapshot figures: declarative build cold vs cached, and sandbox create when the runner must pull."""

from __future__ import annotations

import statistics
import subprocess
import time
import uuid

from daytona import (
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    Daytona,
    Image,
)

from tests.integration.images_fixture import ensure_python_slim_stand_in

ROUNDS = 3


def seconds(action) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def local_tags_of(reference: str) -> list[str]:
    image_id = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", reference],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    listing = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return [line.split()[0] for line in listing if line and image_id.startswith(line.split()[1])]


def bench_snapshots(daytona: Daytona) -> list[str]:
    base = ensure_python_slim_stand_in()
    cold: list[float] = []
    cached: list[float] = []
    for _ in range(ROUNDS):
        image = Image.base(base).run_commands(f"echo bench-{uuid.uuid4().hex}")
        for samples in (cold, cached):
            holder: dict[str, object] = {}

            def create(image: Image = image, holder: dict[str, object] = holder) -> None:
                holder["sandbox"] = daytona.create(CreateSandboxFromImageParams(image=image), timeout=600)

            samples.append(seconds(create))
            daytona.delete(holder["sandbox"])  # type: ignore[arg-type]

    pulls: list[float] = []
    for _ in range(ROUNDS):
        name = f"bench-pull-{uuid.uuid4().hex[:8]}"
        snapshot = daytona.snapshot.create(
            CreateSnapshotParams(name=name, image=Image.base(base).run_commands(f"echo {name}"))
        )
        # This runner forgets the image: the next create must pull it from the platform registry. (With the
        # stack's build engine the runner's engine never had it.)
        reference = snapshot.ref or snapshot.image_name  # type: ignore[attr-defined]
        present = subprocess.run(["podman", "image", "exists", reference], check=False).returncode == 0
        for tag in local_tags_of(reference) if present else []:
            subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, check=False)
        holder: dict[str, object] = {}

        def create_from_snapshot(name: str = name, holder: dict[str, object] = holder) -> None:
            holder["sandbox"] = daytona.create(CreateSandboxFromSnapshotParams(snapshot=name), timeout=600)

        pulls.append(seconds(create_from_snapshot))
        daytona.delete(holder["sandbox"])  # type: ignore[arg-type]
        time.sleep(1)
        daytona.snapshot.delete(name)

    def line(label: str, samples: list[float]) -> str:
        return f"{label:<36} n={len(samples):<3} median={statistics.median(samples) * 1000:9.0f} ms"

    ratio = statistics.median(cold) / statistics.median(cached)
    return [
        line("declarative image, cold build+start", cold),
        line("declarative image, cached", cached) + f"  cold/cached={ratio:5.1f}x",
        line("sandbox from snapshot, runner pulls", pulls),
    ]


def main() -> None:
    from tests.bench.bench_spine import run_with_stack

    run_with_stack([("snapshots", lambda daytona, _stack: bench_snapshots(daytona))])


if __name__ == "__main__":
    main()
