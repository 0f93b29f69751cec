"""Stand-ins for public base images: there is no Docker Hub here, so tests build a local image under the
name a declarative `Image` asks for (e.g. `Image.debian_slim("3.12")` → python:3.12.10-slim-bookworm)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

PYTHON_SLIM = "docker.io/library/python:3.12.10-slim-bookworm"
BASE_IMAGE = "localhost/tidepool/base:bookworm"

# Like the public image, it has no `daytona` user: the platform must create it. Bump to rebuild.
STAND_IN_VERSION = "2"
STAND_IN_DOCKERFILE = f"""FROM {BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 \\
    && rm -rf /var/lib/apt/lists/*
ENV PIP_BREAK_SYSTEM_PACKAGES=1
LABEL io.tidepool.stand-in={STAND_IN_VERSION}
"""


def image_present(name: str) -> bool:
    label = subprocess.run(
        ["podman", "image", "inspect", "--format", '{{index .Labels "io.tidepool.stand-in"}}', name],
        capture_output=True,
        text=True,
        check=False,
    )
    return label.returncode == 0 and label.stdout.strip() == STAND_IN_VERSION


def ensure_python_slim_stand_in() -> str:
    if not image_present(PYTHON_SLIM):
        with tempfile.TemporaryDirectory() as context:
            (Path(context) / "Containerfile").write_text(STAND_IN_DOCKERFILE)
            subprocess.run(
                [
                    "podman",
                    "build",
                    "--ulimit",
                    "nofile=20000:20000",
                    "--ulimit",
                    "nproc=4096:4096",
                    "-t",
                    PYTHON_SLIM,
                    context,
                ],
                check=True,
                capture_output=True,
            )
    return PYTHON_SLIM
