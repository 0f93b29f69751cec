#!/usr/bin/env bash
# Builds Tidepool's base image (Debian bookworm, minbase + ca-certificates) without any registry:
# debootstrap a rootfs from a Debian mirror and `podman import` it. Every sandbox snapshot starts FROM it.
#
# Usage: build-base.sh [IMAGE_NAME]          (default localhost/tidepool/base:bookworm)
# Env:   TIDEPOOL_DATA_DIR                   work dir for the temporary rootfs (default <repo>/.tidepool)
#        TIDEPOOL_DEBIAN_MIRROR              default http://deb.debian.org/debian
#        TIDEPOOL_DEBIAN_SECURITY_MIRROR     default http://deb.debian.org/debian-security ("" to leave out)
#        CONTAINERS_CONF                     honoured by podman as usual (the platform's deploy/podman/containers.conf)
set -euo pipefail

IMAGE_NAME=${1:-localhost/tidepool/base:bookworm}
SUITE=bookworm
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DATA_DIR=${TIDEPOOL_DATA_DIR:-${REPO_ROOT}/.tidepool}
DEBIAN_MIRROR=${TIDEPOOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${TIDEPOOL_DEBIAN_SECURITY_MIRROR-http://deb.debian.org/debian-security}
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "build-base: $*" >&2; }

if podman image exists "${IMAGE_NAME}"; then
  exit 0
fi

if [[ ${EUID} -ne 0 ]]; then
  log "debootstrap and the rootful podman store need root; run with sudo"
  exit 1
fi

mkdir -p "${DATA_DIR}"
# Two callers (platform start-up, tests) may race to build the same image: serialize, then re-check.
exec {lock_fd}>"${DATA_DIR}/build-base.lock"
flock "${lock_fd}"
if podman image exists "${IMAGE_NAME}"; then
  exit 0
fi

started_at=${SECONDS}
rootfs_dir=$(mktemp -d "${DATA_DIR}/base-rootfs.XXXXXX")
trap 'rm -rf --one-file-system "${rootfs_dir}"' EXIT

log "debootstrap ${SUITE} (minbase) from ${DEBIAN_MIRROR}"
debootstrap --variant=minbase --include=ca-certificates "${SUITE}" "${rootfs_dir}" "${DEBIAN_MIRROR}" \
  >"${rootfs_dir}.debootstrap.log" 2>&1 || {
  tail -n 30 "${rootfs_dir}.debootstrap.log" >&2
  rm -f "${rootfs_dir}.debootstrap.log"
  exit 1
}
rm -f "${rootfs_dir}.debootstrap.log"

# Point-release and security updates, so snapshot builds install patched packages.
{
  echo "deb ${DEBIAN_MIRROR} ${SUITE} main"
  echo "deb ${DEBIAN_MIRROR} ${SUITE}-updates main"
  if [[ -n ${DEBIAN_SECURITY_MIRROR} ]]; then
    echo "deb ${DEBIAN_SECURITY_MIRROR} ${SUITE}-security main"
  fi
} >"${rootfs_dir}/etc/apt/sources.list"

# Same container hygiene as Debian's official images: drop downloaded .debs after every install and
# never keep docs/man pages/translations (copyright files stay), which keeps every layer lean.
cat >"${rootfs_dir}/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT
cat >"${rootfs_dir}/etc/dpkg/dpkg.cfg.d/docker-excludes" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG

# Host-specific and cache files debootstrap leaves behind; podman provides hostname/resolv.conf at run time.
rm -rf "${rootfs_dir}"/var/lib/apt/lists/* "${rootfs_dir}"/var/cache/apt/* "${rootfs_dir}"/var/log/*.log \
  "${rootfs_dir}"/var/cache/debconf/*-old "${rootfs_dir}"/usr/share/doc/* "${rootfs_dir}"/usr/share/man/* \
  "${rootfs_dir}"/tmp/* "${rootfs_dir}"/root/.bash_history
: >"${rootfs_dir}/etc/hostname"
: >"${rootfs_dir}/etc/resolv.conf"
: >"${rootfs_dir}/etc/machine-id"

log "importing as ${IMAGE_NAME}"
tar --numeric-owner --xattrs -C "${rootfs_dir}" -c . |
  podman import --quiet \
    --change 'CMD ["/bin/bash"]' \
    --change "ENV PATH=${IMAGE_PATH}" \
    --change 'LABEL io.tidepool.image=base' \
    --message "tidepool base: debian ${SUITE} minbase" \
    - "${IMAGE_NAME}" >/dev/null

log "built ${IMAGE_NAME} in $((SECONDS - started_at))s"
