#!/usr/bin/env bash
# The release artefacts (what `make release` runs):
#
#   scripts/release.sh [OUT_DIR]        (default dist/)
#
#   OUT_DIR/install.yaml      the CRDs and every manifest, one file:
#                             kubectl apply -f install.yaml
#   OUT_DIR/sbom.spdx.json    SPDX 2.3 SBOM of the image's Python packages
#
# The version is pyproject.toml's, the one place it is written. The image is
# tether:<version> (IMAGE=name overrides the name), or, when Docker answers and the
# image was built and pushed (it has a registry digest), name@sha256:<digest>: a
# digest names exactly one image, a tag can be moved.
#
# kubectl (its built-in kustomize renders manifests/): $KUBECTL, else the dev stack's
# build (TETHER_BIN_DIR or ~/.cache/tether/bin/*/kubectl), else the one on PATH.
# Nothing here needs the network.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/dist}"
die() { echo "release: $*" >&2; exit 1; }
log() { echo "release: $*" >&2; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)"
[[ -n "$version" ]] || die "no version in pyproject.toml"
image="${IMAGE:-tether}"

kubectl="${KUBECTL:-}"
if [[ -z "$kubectl" && -n "${TETHER_BIN_DIR:-}" && -x "$TETHER_BIN_DIR/kubectl" ]]; then
    kubectl="$TETHER_BIN_DIR/kubectl"
fi
if [[ -z "$kubectl" ]]; then
    cache="${TETHER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tether}"
    for candidate in "$cache"/bin/*/kubectl; do
        [[ -x "$candidate" ]] && kubectl="$candidate"
    done
fi
if [[ -z "$kubectl" ]]; then
    kubectl="$(command -v kubectl || true)"
fi
[[ -n "$kubectl" ]] || die "no kubectl: build the dev stack's (make binaries) or put one on PATH"

# The image reference: by digest when a built image has one, else by tag.
reference="$image:$version"
kustomize_image="newName: $image
    newTag: \"$version\""
if command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1 \
        && docker image inspect "$image:$version" >/dev/null 2>&1; then
    # Only a digest under a registry's name (a host with a dot or a port, or
    # localhost): Docker's containerd image store gives every local image a digest
    # too ("tether@sha256:..."), which no node can pull.
    digest="$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$image:$version" \
        | { grep -E '^([^/]*[.:][^/]*|localhost)/' || true; } \
        | sed -n 's/^.*@\(sha256:[0-9a-f]\{64\}\)$/\1/p' | head -n 1)"
    if [[ -n "$digest" ]]; then
        reference="$image@$digest"
        kustomize_image="newName: $image
    digest: \"$digest\""
    else
        # A local build has an image ID but no registry digest: the ID is not a
        # reference a node can pull, so the tag stays.
        log "$image:$version has no registry digest (not pushed): using the tag"
    fi
else
    log "no built image $image:$version that Docker reports: using the tag"
fi

mkdir -p "$out"
# A throwaway overlay inside OUT_DIR, so manifests/ itself is never edited.
overlay="$(mktemp -d "$out/.overlay.XXXXXX")"
trap 'rm -rf "$overlay"' EXIT
base="$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' \
    "$root/manifests" "$overlay")"
cat > "$overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $base
images:
  - name: ghcr.io/tether-dev/tether
    $kustomize_image
EOF

{
    echo "# Tether $version: the CRDs and the operator, one file (make release)."
    echo "#   kubectl apply -f install.yaml"
    echo "# Image: $reference"
    "$kubectl" kustomize "$overlay"
} > "$out/install.yaml.tmp"
mv "$out/install.yaml.tmp" "$out/install.yaml"
log "wrote $out/install.yaml ($reference, kubectl: $kubectl)"

# The commit's time as the SBOM's creation time, so a rebuilt release is byte-identical.
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)"
    export SOURCE_DATE_EPOCH
fi
python3 "$root/scripts/sbom.py" --lock "$root/requirements.lock" --version "$version" \
    --dockerfile "$root/Dockerfile" > "$out/sbom.spdx.json.tmp"
mv "$out/sbom.spdx.json.tmp" "$out/sbom.spdx.json"
log "wrote $out/sbom.spdx.json"
