#!/usr/bin/env bash
# engine.sh - print the container engine the image targets use:
#   $CONTAINER_ENGINE if set; else docker if its daemon answers (`docker info`);
#   else podman; else buildah (build only: test-image needs docker or podman).
# Exits 1 with a message on stderr when none is usable.
set -euo pipefail
if [[ -n "${CONTAINER_ENGINE:-}" ]]; then
  command -v "$CONTAINER_ENGINE" >/dev/null 2>&1 || {
    echo "engine.sh: CONTAINER_ENGINE=$CONTAINER_ENGINE not found" >&2
    exit 1
  }
  echo "$CONTAINER_ENGINE"
  exit 0
fi
if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
  echo docker
elif command -v podman >/dev/null 2>&1; then
  echo podman
elif command -v buildah >/dev/null 2>&1; then
  echo buildah
else
  echo "engine.sh: no container engine: docker (with a running daemon), podman or buildah is needed" >&2
  exit 1
fi
