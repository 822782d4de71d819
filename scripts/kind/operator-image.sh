#!/usr/bin/env bash
# Build the operator image from the Dockerfile (what `make image` runs):
#
#   scripts/kind/operator-image.sh [TAG]        (default tether:dev)
#
# With the pinned Python base image available (present, or pulled), this is a plain
# `docker build`. Where it cannot be pulled (no registry), the base is a Debian
# bookworm with Debian's Python 3.11, built by debootstrap
# (scripts/kind/images.sh python-base), passed as --build-arg PYTHON_IMAGE. The
# Dockerfile is the same either way.
set -euo pipefail
# shellcheck source=scripts/kind/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tag="${1:-tether:dev}"
pinned="$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$KIND_ROOT/Dockerfile")"
[[ -n "$pinned" ]] || die "no ARG PYTHON_IMAGE in the Dockerfile"

# The image's version label comes from pyproject.toml, where the version is written once.
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$KIND_ROOT/pyproject.toml" | head -n 1)"
[[ -n "$version" ]] || die "no version in pyproject.toml"
args=(--build-arg "VERSION=$version")
if docker image inspect "$pinned" >/dev/null 2>&1; then
    log "base image $pinned is present"
elif timeout 120 docker pull -q "$pinned" >/dev/null 2>&1; then
    log "pulled the base image $pinned"
else
    log "cannot pull $pinned: building a Debian bookworm + python3.11 base instead"
    base="$("$KIND_ROOT/scripts/kind/images.sh" python-base)"
    args+=(--build-arg "PYTHON_IMAGE=$base")
fi
log "docker build -t $tag ${args[*]} ."
# The legacy builder when BuildKit's CLI plugin is missing: it needs nothing pulled
# (BuildKit would fetch the Dockerfile frontend named by "# syntax=").
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi
docker build -t "$tag" "${args[@]}" "$KIND_ROOT"
