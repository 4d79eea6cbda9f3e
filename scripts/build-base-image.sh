#!/usr/bin/env bash
# Build a local stand-in for docker.io/library/python:3.11-slim where no public container
# registry can be reached: debootstrap a minimal Debian bookworm, import it into podman, then add
# Debian's python3 + venv + pip and the `python`/`pip` names. The project's real Dockerfiles then
# build unchanged with `--pull=never`. Idempotent: does nothing when the tag already exists.
#
# Usage: scripts/build-base-image.sh [--force]
# Env:   BASE_TAG (default docker.io/library/python:3.11-slim), DEBIAN_MIRROR, CONTAINERS_CONF
set -euo pipefail

BASE_TAG="${BASE_TAG:-docker.io/library/python:3.11-slim}"
ROOTFS_TAG="localhost/catsdogs/debian-bookworm-minbase:latest"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/deploy/podman/containers.conf}"

if [[ "${1:-}" != "--force" ]] && podman image exists "$BASE_TAG"; then
  echo "base image $BASE_TAG already exists; nothing to do (--force rebuilds it)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ "${1:-}" == "--force" ]] || ! podman image exists "$ROOTFS_TAG"; then
  echo "debootstrap bookworm (minbase) from $MIRROR ..."
  debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
  }
  # What python:3.11-slim leaves out too: package caches and lists, docs, man pages, translations.
  rm -rf "$work/rootfs/var/cache/apt/"* "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/log/"* \
    "$work/rootfs/usr/share/doc/"* "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/locale/"* \
    "$work/rootfs/usr/share/info/"*
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$ROOTFS_TAG"
fi

cat >"$work/Containerfile" <<CONTAINERFILE
FROM $ROOTFS_TAG
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \\
 && ln -sf /usr/bin/python3 /usr/local/bin/python && ln -sf /usr/bin/pip3 /usr/local/bin/pip \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/* /usr/share/doc/* /usr/share/man/* \\
 && find /usr/lib/python3* -depth -name __pycache__ -type d -exec rm -rf {} +
CMD ["python3"]
CONTAINERFILE
podman build --network=host --pull=never -t "$BASE_TAG" -f "$work/Containerfile" "$work"
echo "built $BASE_TAG"
