# shellcheck shell=bash
# Shared helpers of the kind scripts (sourced, not run): where the cache is, how a
# pinned Go build module under devbin/ becomes programs in that cache, and logging.
#
# Every build goes to a directory named after a hash of its module's go.mod and
# go.sum, so changing a pin builds afresh and an unchanged pin is reused; a build
# goes to a temporary directory first and is renamed into place when complete, so
# an interrupted build never leaves a half-written program that a later run trusts.

KIND_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TETHER_CACHE="${TETHER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tether}"
KIND_CACHE="$TETHER_CACHE/kind"
# Kubernetes version of the node image: the pin of devbin/kubernetes.
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$KIND_ROOT/devbin/kubernetes/go.mod")"

log() { printf '\n==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# module_stamp MODULE: a short hash of the module's pins (go.mod, go.sum, sources).
module_stamp() {
    local dir="$KIND_ROOT/devbin/$1"
    # go.sum is absent in a module without dependencies (devbin/pause).
    (cd "$dir" && shopt -s nullglob && cat go.mod go.sum* ./*.go) | sha256sum | cut -c1-12
}

# gobuild MODULE [ENV=VALUE...] [-- GO BUILD FLAGS...]: build every `tool` of
# devbin/MODULE (or its main package when it has none) and print the directory.
gobuild() {
    local module=$1; shift
    local -a envs=() flags=()
    while (($#)); do
        if [[ $1 == -- ]]; then shift; flags=("$@"); break; fi
        envs+=("$1"); shift
    done
    local dir="$KIND_ROOT/devbin/$module"
    local out
    out="$KIND_CACHE/bin/$module-$(module_stamp "$module")"
    if [[ -f "$out/.complete" ]]; then
        printf '%s\n' "$out"
        return 0
    fi
    local -a packages
    mapfile -t packages < <(cd "$dir" && go list tool 2>/dev/null)
    ((${#packages[@]})) || packages=(.)
    mkdir -p "$KIND_CACHE/bin"
    local tmp
    tmp="$(mktemp -d "$KIND_CACHE/bin/.build-$module-XXXXXX")"
    log "building devbin/$module (${packages[*]}) into $out; a first build takes minutes" 
    local started=$SECONDS
    if ! (cd "$dir" && env "${envs[@]}" go build -trimpath "${flags[@]}" -o "$tmp/" "${packages[@]}") >&2; then
        rm -rf "$tmp"
        die "go build in devbin/$module failed"
    fi
    touch "$tmp/.complete"
    rm -rf "$out"
    mv "$tmp" "$out"
    log "devbin/$module built in $((SECONDS - started)) s"
    printf '%s\n' "$out"
}

# kubernetes_ldflags: the version stamps a Kubernetes release build carries, so
# kubeadm and the kubelet report (and check) v$K8S_VERSION, not v0.0.0.
kubernetes_ldflags() {
    local v=$K8S_VERSION minor
    minor="$(cut -d. -f2 <<<"$v")"
    local stamps="" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        stamps+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    printf '%s' "${stamps# }"
}
