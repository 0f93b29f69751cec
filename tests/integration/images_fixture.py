"""Stand-ins for public base images: there is no Docker Hub here, so tests build a local image under the
name a declarative `Image` asks for (e.g. `Image.debian_slim("3.12")` → python:3.12.10-slim-bookworm)."""

from __future__ import annotations

import json
import shutil
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


# ----- images without the toolbox's needs (issue #15): built from Debian packages, no registry -----------

# Under Docker Hub names, like the python stand-in: a tenant may not name another's `localhost/` image, and
# the builder finds these locally without pulling.
BUSYBOX_MUSL_IMAGE = "docker.io/tidepooltest/busybox-musl:1"
# 2: no /etc, /tmp or /home at all (a `FROM scratch` image), and a CMD that needs no shell.
DISTROLESS_IMAGE = "docker.io/tidepooltest/distroless:2"
DISTROLESS_CMD = ["/app/tool", "true"]
# Busybox applets linked into the Alpine stand-in (the ones the tests and the daemon's shells use).
BUSYBOX_APPLETS = (
    "sh ash cat echo env id ls mkdir printf pwd rm sleep stty true false whoami uname head tail grep"
    " sed tr wc kill ps test [ readlink"
)
_ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
}


def _debian_package(name: str, into: Path) -> None:
    """Unpack Debian's package `name` (fetched by apt from the host's configured mirror) into `into`."""
    with tempfile.TemporaryDirectory() as downloads:
        subprocess.run(["apt-get", "download", name], cwd=downloads, check=True, capture_output=True)
        (deb,) = Path(downloads).glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True, capture_output=True)


def _import_rootfs(rootfs: Path, name: str, *, scratch: bool = False, changes: tuple[str, ...] = ()) -> None:
    """`podman import` a folder as a one-layer image labelled with STAND_IN_VERSION, with the /etc files
    and /tmp, /root, /home of a distribution unless `scratch`; `changes` are more `--change` lines."""
    if not scratch:
        for relative, text in _ETC_FILES.items():
            (rootfs / relative).parent.mkdir(parents=True, exist_ok=True)
            (rootfs / relative).write_text(text)
        for folder in ("tmp", "root", "home"):
            (rootfs / folder).mkdir(exist_ok=True)
        (rootfs / "tmp").chmod(0o1777)
    with tempfile.TemporaryDirectory() as scratch:
        tarball = Path(scratch) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        subprocess.run(
            [
                "podman",
                "import",
                "--change",
                f"LABEL io.tidepool.stand-in={STAND_IN_VERSION}",
                *(argument for change in changes for argument in ("--change", change)),
                str(tarball),
                name,
            ],
            check=True,
            capture_output=True,
        )


def ensure_busybox_musl_image() -> str:
    """Stands for Alpine: no glibc at all. Debian's busybox-static as /bin/busybox (sh = its ash) and
    Debian's musl loader at /lib/ld-musl-x86_64.so.1; nothing else."""
    if not image_present(BUSYBOX_MUSL_IMAGE):
        with tempfile.TemporaryDirectory() as work:
            packages, rootfs = Path(work) / "packages", Path(work) / "rootfs"
            for package in ("busybox-static", "musl"):
                _debian_package(package, packages)
            (rootfs / "bin").mkdir(parents=True)
            (packages / "bin" / "busybox").rename(rootfs / "bin" / "busybox")
            for applet in BUSYBOX_APPLETS.split():
                (rootfs / "bin" / applet).symlink_to("busybox")
            # musl's own layout: lib/ld-musl-x86_64.so.1 -> x86_64-linux-musl/libc.so, plus its path files.
            shutil.copytree(packages / "lib", rootfs / "lib", symlinks=True)
            shutil.copytree(packages / "etc", rootfs / "etc", symlinks=True)
            _import_rootfs(rootfs, BUSYBOX_MUSL_IMAGE)
    return BUSYBOX_MUSL_IMAGE


def ensure_distroless_image() -> str:
    """Distroless-style, as `FROM scratch` + one COPY: one static program (Debian's busybox-static, under a
    name that is no shell) as its CMD, and nothing else: no /etc (no passwd, no group), no /tmp, no shell,
    no python, no libc."""
    if not image_present(DISTROLESS_IMAGE):
        with tempfile.TemporaryDirectory() as work:
            packages, rootfs = Path(work) / "packages", Path(work) / "rootfs"
            _debian_package("busybox-static", packages)
            (rootfs / "app").mkdir(parents=True)
            (packages / "bin" / "busybox").rename(rootfs / "app" / "tool")
            _import_rootfs(
                rootfs, DISTROLESS_IMAGE, scratch=True, changes=(f"CMD {json.dumps(DISTROLESS_CMD)}",)
            )
    return DISTROLESS_IMAGE
