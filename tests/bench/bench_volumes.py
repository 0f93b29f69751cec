"""Volumes (issue #13): sequential write and read throughput and the small-file create rate on a volume
(a FUSE `rclone mount` of the object storage), each as a ratio to the same work on the sandbox's own disk
in the same run. Measured inside the sandbox, so the toolbox round trip is not part of the figures."""

from __future__ import annotations

import json
import os
import uuid

from daytona import CreateSandboxFromSnapshotParams, Daytona, VolumeMount

SEQUENTIAL_MB = int(os.environ.get("BENCH_VOLUME_MB", "64"))
SMALL_FILES = int(os.environ.get("BENCH_VOLUME_FILES", "200"))
VOLUME_PATH = "/home/daytona/vol"
LOCAL_PATH = "/home/daytona/local"

# Write (closed and fsync'd: on the volume, close uploads), read back in 1 MiB blocks, then small files
# of 1 KiB, each created, written and closed.
PROBE = """
import json, os, sys, time
root, mb, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(root, exist_ok=True)
block = os.urandom(1 << 20)
path = os.path.join(root, "seq.bin")
began = time.perf_counter()
with open(path, "wb") as out:
    for _ in range(mb):
        out.write(block)
    out.flush()
    os.fsync(out.fileno())
write_s = time.perf_counter() - began
began = time.perf_counter()
with open(path, "rb") as source:
    while source.read(1 << 20):
        pass
read_s = time.perf_counter() - began
small = os.path.join(root, "small")
os.makedirs(small, exist_ok=True)
began = time.perf_counter()
for index in range(files):
    with open(os.path.join(small, f"f{index}"), "wb") as out:
        out.write(block[:1024])
small_s = time.perf_counter() - began
print(json.dumps({"write_mb_s": mb / write_s, "read_mb_s": mb / read_s, "files_s": files / small_s}))
"""


def measure(sandbox: object, root: str) -> dict[str, float]:
    sandbox.fs.upload_file(PROBE.encode(), "/tmp/probe.py")  # type: ignore[attr-defined]
    response = sandbox.process.exec(  # type: ignore[attr-defined]
        f"python3 /tmp/probe.py {root} {SEQUENTIAL_MB} {SMALL_FILES}", timeout=600
    )
    if response.exit_code != 0:
        raise RuntimeError(f"probe failed on {root}: {response.result}")
    return json.loads(response.result.strip().splitlines()[-1])


def bench_volumes(daytona: Daytona) -> list[str]:
    volume = daytona.volume.create(f"bench-{uuid.uuid4().hex[:8]}")
    sandbox = daytona.create(
        CreateSandboxFromSnapshotParams(volumes=[VolumeMount(volume_id=volume.id, mount_path=VOLUME_PATH)]),
        timeout=300,
    )
    try:
        local = measure(sandbox, LOCAL_PATH)
        on_volume = measure(sandbox, VOLUME_PATH)
    finally:
        daytona.delete(sandbox)
    try:
        daytona.volume.delete(volume)
    except Exception as error:  # a bench: report, do not fail on clean-up
        print(f"volume clean-up: {error}")
    rows = [
        ("sequential write", "write_mb_s", "MB/s"),
        ("sequential read", "read_mb_s", "MB/s"),
        ("small-file create (1 KiB)", "files_s", "files/s"),
    ]
    return [
        f"{'volume ' + label:<34} volume={on_volume[key]:9.1f} {unit:<7} "
        f"own disk={local[key]:9.1f} {unit:<7} ratio={on_volume[key] / local[key]:6.3f}x"
        for label, key, unit in rows
    ]
