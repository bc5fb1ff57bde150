#!/usr/bin/env bash
# Build deployments/Dockerfile with podman on a machine that reaches no container registry:
# the base is Debian bookworm made by debootstrap from Debian's packages and imported once per
# machine (cached as an image in podman's store), and Python packages come from the uv cache
# that `make install` already filled, mounted into the build. A rebuild with nothing changed
# reuses every layer.
#
#   deployments/podman/build-image.sh [TAG]      (make image)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deployments/podman/containers.conf}"
TAG="${1:-localhost/gaia-flows:dev}"
BASE="${GAIA_FLOWS_BASE_IMAGE:-localhost/gaia-flows-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
UV_CACHE="${UV_CACHE_DIR:-$(.venv/bin/uv cache dir 2>/dev/null || echo "$HOME/.cache/uv")}"

if ! podman image exists "$BASE"; then
  root="$(mktemp -d "${TMPDIR:-/tmp}/gaia-flows-base.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

# The host's CA bundle, for package downloads through a TLS-re-signing proxy; mounted for the
# build only, so it never becomes part of an image layer.
CA="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
tls=()
if [ -f "$CA" ]; then
  tls=(--volume "$CA:/run/build-ca.crt:ro" --build-arg SSL_CERT_FILE=/run/build-ca.crt --build-arg PIP_CERT=/run/build-ca.crt)
fi

mkdir -p "$UV_CACHE"
podman build --network host --build-arg BASE_IMAGE="$BASE" --volume "$UV_CACHE:/root/.cache/uv" "${tls[@]}" \
  -f deployments/Dockerfile -t "$TAG" .
