#!/usr/bin/env bash
# local_build.sh - build and test the CPU backend image on a machine with no Docker engine
# and no container registry (only Debian's and PyPI's package repositories), as root.
#
#   tests/image/local_build.sh
#
# 1. setup   apt-get install podman buildah runc debootstrap (if missing) and, if
#            /etc/containers/containers.conf does not exist, write one with runtime=runc
#            (crun fails on hosts with hybrid cgroup v1/v2), cgroupfs, and default
#            ulimits nofile=20000:20000 nproc=32768:32768 (the engine's defaults exceed
#            what a sandboxed host allows). Both are left in place afterwards.
# 2. base    debootstrap --variant=minbase bookworm into $BASE_DIR and import it as
#            $BASE_IMAGE (Debian 12: Python 3.11, glibc 2.36). It is the builder base
#            (no registry to pull ubuntu:24.04 from) and, having no Python at all, the
#            container test-image runs the unpacked worker in.
# 3. build   make docker-build-cpu BASE_IMAGE=$BASE_IMAGE, plus, when present, a local
#            wheel directory (WHEEL_DIR, default /opt/wheels: torch==2.13.0+cpu when
#            PyTorch's index is unreachable) mounted read-only with PIP_FIND_LINKS, and
#            the host's CA bundle (HOST_CA, default $PIP_CERT or $SSL_CERT_FILE: for a
#            TLS-inspecting egress proxy) mounted read-only with PIP_CERT.
# 4. test    make test-image (removes the image afterwards unless KEEP_IMAGE=1)
# 5. clean   removes $BASE_IMAGE and $BASE_DIR (KEEP_BASE=1 keeps them). The engine's
#            layer storage (/var/lib/containers) keeps nothing of ours after that.
#
# Environment: BASE_IMAGE (default localhost/bookworm-minbase), BASE_DIR (default
# /var/tmp/vllm-backend-bookworm-minbase), DEBIAN_MIRROR (default
# http://deb.debian.org/debian), WHEEL_DIR, HOST_CA, KEEP_BASE, KEEP_IMAGE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BASE_IMAGE="${BASE_IMAGE:-localhost/bookworm-minbase}"
BASE_DIR="${BASE_DIR:-/var/tmp/vllm-backend-bookworm-minbase}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEEL_DIR="${WHEEL_DIR:-/opt/wheels}"
HOST_CA="${HOST_CA:-${PIP_CERT:-${SSL_CERT_FILE:-}}}"

log() { printf '[local_build] %s\n' "$*"; }
now() { date +%s; }
T0=$(now)
TIMES=()
timed() { # timed NAME cmd...
  local name="$1" t
  shift
  t=$(now)
  log "==> $name: $*"
  "$@"
  TIMES+=("$(printf '%-8s %6ss' "$name" "$(($(now) - t))")")
  log "<== $name: $(($(now) - t))s"
}

[[ $EUID -eq 0 ]] || {
  echo "local_build.sh: run as root (debootstrap, rootful podman)" >&2
  exit 1
}

cleanup() {
  local rc=$?
  if [[ "${KEEP_BASE:-0}" == 1 ]]; then
    log "kept $BASE_IMAGE and $BASE_DIR (KEEP_BASE=1)"
  else
    podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
    rm -rf "$BASE_DIR"
    log "removed $BASE_IMAGE and $BASE_DIR"
  fi
  log "timings:"
  for l in "${TIMES[@]}"; do log "  $l"; done
  log "  $(printf '%-8s %6ss' total "$(($(now) - T0))")"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

setup() {
  local need=()
  for c in podman buildah runc debootstrap; do command -v "$c" >/dev/null 2>&1 || need+=("$c"); done
  if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [[ ! -e /etc/containers/containers.conf ]]; then
    mkdir -p /etc/containers
    cat >/etc/containers/containers.conf <<'EOF'
# Written by tests/image/local_build.sh (vLLM backend image build): crun fails on hosts
# with hybrid cgroups, and the default ulimits exceed what a sandboxed host allows.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    log "wrote /etc/containers/containers.conf (runtime=runc, lower default ulimits)"
  fi
  podman --version
}

make_base() {
  if podman image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE exists: reused"
    return
  fi
  rm -rf "$BASE_DIR"
  debootstrap --variant=minbase bookworm "$BASE_DIR" "$DEBIAN_MIRROR" >"$BASE_DIR.log" 2>&1 || {
    tail -n 20 "$BASE_DIR.log" >&2
    return 1
  }
  rm -f "$BASE_DIR.log"
  tar -C "$BASE_DIR" -c . | podman import - "$BASE_IMAGE" >/dev/null
  log "$BASE_IMAGE: $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%d MB", $1 / 1e6 }')"
}

build() {
  local flags=()
  if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    flags+=(-v "$WHEEL_DIR:/opt/extra-wheels:ro" --build-arg PIP_FIND_LINKS=/opt/extra-wheels)
    log "local wheels: $WHEEL_DIR -> PIP_FIND_LINKS=/opt/extra-wheels"
  fi
  if [[ -n "$HOST_CA" && -f "$HOST_CA" ]]; then
    flags+=(-v "$HOST_CA:/opt/host-ca.crt:ro" --build-arg PIP_CERT=/opt/host-ca.crt)
    log "CA bundle: $HOST_CA -> PIP_CERT=/opt/host-ca.crt"
  fi
  CONTAINER_ENGINE=podman make docker-build-cpu BASE_IMAGE="$BASE_IMAGE" \
    DOCKER_BUILD_FLAGS="${flags[*]}"
}

timed setup setup
timed base make_base
timed build build
timed test env CONTAINER_ENGINE=podman RUN_BASE="$BASE_IMAGE" make test-image
