#!/usr/bin/env bash
# Idempotent host setup for a fresh Debian (bookworm) machine: the container engine Tidepool drives
# (podman + runc), the tools that build the base image, fuse3 (volumes are FUSE mounts), and `*.localhost`
# name resolution.
# Run as root or via sudo. Prints one line per change; a fully set-up host is a fast no-op.
set -euo pipefail

# chromium: the browser the dashboard tests drive (Playwright with executable_path, never a downloaded build).
REQUIRED_PACKAGES=(podman runc debootstrap catatonit uidmap libnss-myhostname docker-registry openssl fuse3 openssh-client chromium)
NSSWITCH_FILE=/etc/nsswitch.conf

if [[ ${EUID} -ne 0 ]]; then
  exec sudo --preserve-env=DEBIAN_FRONTEND -- "$0" "$@"
fi

log() { echo "setup-host: $*"; }

# apt's progress and debconf notices are noise on success; show them only when the command fails.
run_quietly() {
  local output
  if ! output=$("$@" 2>&1); then
    echo "${output}" >&2
    log "failed: $*"
    return 1
  fi
}

missing_packages() {
  local package status
  for package in "${REQUIRED_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "${package}" 2>/dev/null || true)
    [[ ${status} == "install ok installed" ]] || echo "${package}"
  done
}

# apt's package lists are needed only when something must be installed and apt doesn't know it yet
# (fresh images ship without lists).
apt_knows_candidates() {
  local package
  for package in "$@"; do
    apt-cache policy "${package}" 2>/dev/null | grep -q 'Candidate: [^(]' || return 1
  done
}

install_missing_packages() {
  local -a missing
  mapfile -t missing < <(missing_packages)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  export DEBIAN_FRONTEND=noninteractive
  if ! apt_knows_candidates "${missing[@]}"; then
    run_quietly apt-get update
    log "ran apt-get update"
  fi
  run_quietly apt-get install -y --no-install-recommends "${missing[@]}"
  log "installed ${missing[*]}"
}

# libnss-myhostname resolves *.localhost to loopback, so sandbox preview URLs like
# http://3000-<id>.localhost work without DNS setup. It only acts when listed in the hosts line.
ensure_myhostname_in_nsswitch() {
  if grep -Eq '^hosts:.*\bmyhostname\b' "${NSSWITCH_FILE}" 2>/dev/null; then
    return 0
  fi
  if grep -Eq '^hosts:' "${NSSWITCH_FILE}" 2>/dev/null; then
    # Right after `files` so /etc/hosts still wins, before `dns` so *.localhost never leaves the host.
    if grep -Eq '^hosts:.*\bfiles\b' "${NSSWITCH_FILE}"; then
      sed -Ei '/^hosts:/ s/\bfiles\b/files myhostname/' "${NSSWITCH_FILE}"
    else
      sed -Ei '/^hosts:/ s/^hosts:[[:space:]]*/&myhostname /' "${NSSWITCH_FILE}"
    fi
  else
    echo "hosts:          files myhostname dns" >>"${NSSWITCH_FILE}"
  fi
  log "added myhostname to the hosts line of ${NSSWITCH_FILE}"
}

# Podman's `--userns=auto` gives each sandbox its own slice of this range (65536 ids each: 16384
# sandboxes), far above any uid the host uses, so a sandbox's root is nobody on the host (issue #7).
# Snapshot builds take theirs from a second, disjoint range (4096 builds at once), named after the build
# engine's `root-auto-userns-user`: a build step never shares a host uid with a sandbox.
SUBID_RANGES=("containers:268435456:1073741824" "tidepool-builds:1342177280:268435456")
ensure_subordinate_ids() {
  local file range
  for file in /etc/subuid /etc/subgid; do
    touch "${file}"
    for range in "${SUBID_RANGES[@]}"; do
      if ! grep -q "^${range%%:*}:" "${file}"; then
        echo "${range}" >>"${file}"
        log "added ${range} to ${file}"
      fi
    done
  done
}

# tests/unit/deploy renders deploy/k8s with `kubectl kustomize` (kustomize v5: components). The machine image
# ships kubectl; Debian's own (kubernetes-client, 1.20) predates components, so it is no substitute: say so.
check_kubectl() {
  local version
  version=$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -1)
  if [[ -z ${version} || ${version} -lt 27 ]]; then
    log "warning: kubectl >= 1.27 not found; tests/unit/deploy need it (deploy/k8s/README.md, Tests)"
  fi
}

install_missing_packages
ensure_myhostname_in_nsswitch
ensure_subordinate_ids
check_kubectl
