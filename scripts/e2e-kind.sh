#!/usr/bin/env bash
# End-to-end run on kind, what `make e2e-kind` runs:
#
#   0. a Docker engine: the one that answers, else one started from pinned builds
#      (scripts/kind/engine.sh; stopped again at the end);
#   1. create a kind cluster from kind-config.yaml (or reuse one of that name), with
#      the pinned node image, or, where it cannot be pulled, a node image built here
#      (scripts/kind/images.sh node);
#   2. build the operator image (scripts/kind/operator-image.sh, what `make image`
#      runs) and load it into the cluster;
#   3. deploy a throwaway Consul and etcd (scripts/kind/*.yaml), their images pulled
#      or, without a registry, built from the dev stack's programs;
#   4. install Tether exactly as a user would, one of two ways (TETHER_KIND_INSTALL):
#        overlay  `kubectl apply -k scripts/kind/overlay` (manifests/ + the local
#                 image + the in-cluster endpoints);
#        release  `kubectl apply -f install.yaml`, the file `make release` writes,
#                 unchanged, then tether-config edited as a user configures it;
#   5. wait for the Deployment, then run tests/kind against the cluster;
#   6. delete the cluster (keep it with KEEP_CLUSTER=1) and stop what step 0 started.
# Each stage's time is printed at the end and written to .tether/kind/timings.txt.
#
# Needs: nothing but this repository, Go and Debian's apt on a machine without
# Docker or a registry (everything is built from pinned sources into
# ~/.cache/tether; the first run takes long); Docker, kind v0.31.0+ and kubectl on a
# machine with them. The kubeconfig is written to .tether/kind/ and never touches
# ~/.kube/config.
#
# Environment:
#   KIND_CLUSTER_NAME  cluster name (default: tether-e2e)
#   KEEP_CLUSTER=1     leave the cluster (and a started engine) running afterwards
#                      (a rerun reuses them)
#   KIND_NODE_IMAGE    node image to use instead of kind-config.yaml's
#   TETHER_KIND_INSTALL  overlay (default) or release (what CI runs, .ci/run): how
#                      step 4 installs Tether
#   PYTHON             interpreter with pytest (default: .venv/bin/python, else python3)
# Extra arguments are passed to pytest, e.g. scripts/e2e-kind.sh -k failover
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/kind/lib.sh
source "$ROOT/scripts/kind/lib.sh"

CLUSTER="${KIND_CLUSTER_NAME:-tether-e2e}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
# Must match "images:" in scripts/kind/overlay/kustomization.yaml.
IMAGE="tether:e2e"
INSTALL="${TETHER_KIND_INSTALL:-overlay}"
case "$INSTALL" in
    overlay | release) ;;
    *) die "TETHER_KIND_INSTALL=$INSTALL: expected overlay or release" ;;
esac
STATE_DIR="$ROOT/.tether/kind"
RELEASE_DIR="$STATE_DIR/release"
TIMINGS="$STATE_DIR/timings.txt"
export KUBECONFIG="$STATE_DIR/$CLUSTER.kubeconfig"
mkdir -p "$STATE_DIR"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import pytest' 2>/dev/null \
    || die "$PYTHON has no pytest: run \`pip install -e '.[dev]'\` (or set PYTHON=...)"

# --- stage timing -----------------------------------------------------------------
declare -a STAGES=()
stage_started=0
stage_name=""
stage() {  # stage NAME: close the running stage, start NAME
    stage_end
    stage_name=$1
    stage_started=$SECONDS
    log "stage: $1"
}
stage_end() {
    if [[ -n "$stage_name" ]]; then
        STAGES+=("$(printf '%-16s %5d s' "$stage_name" $((SECONDS - stage_started)))")
        stage_name=""
    fi
}
print_timings() {
    stage_end
    ((${#STAGES[@]})) || return 0
    { echo "# scripts/e2e-kind.sh $(date -u +%FT%TZ)"; printf '%s\n' "${STAGES[@]}"; } >"$TIMINGS"
    log "stage times (also in ${TIMINGS#"$ROOT"/})"
    printf '  %s\n' "${STAGES[@]}" >&2
}

# pullable IMAGE: present, or pulled now (bounded: without a registry a pull can hang).
pullable() {
    docker image inspect "$1" >/dev/null 2>&1 && return 0
    timeout 120 docker pull -q "$1" >/dev/null 2>&1
}

# --- 0. engine and tools --------------------------------------------------------------
stage engine
ENGINE_STARTED=0
if [[ -z "${DOCKER_HOST:-}" ]] && ! timeout 20 docker info >/dev/null 2>&1 \
    && ! "$ROOT/scripts/kind/engine.sh" status | grep -q 'started by this script'; then
    ENGINE_STARTED=1
fi
docker_host="$("$ROOT/scripts/kind/engine.sh" up)"
if [[ -n "$docker_host" ]]; then export DOCKER_HOST="$docker_host"; fi

if ! command -v kind >/dev/null; then
    PATH="$(gobuild kind CGO_ENABLED=0):$PATH"
fi
if ! command -v kubectl >/dev/null || ! kubectl version --client 2>/dev/null | grep -q 'v1\.3[4-6]\.'; then
    # kubectl within one minor of the cluster: the dev stack's pinned build.
    kubectl_path="$( (cd operator && "$PYTHON" -m tether_dev.binaries) | awk '$1 == "kubectl" {print $2}')"
    [[ -x "$kubectl_path" ]] || die "no kubectl (make binaries builds one)"
    PATH="$(dirname "$kubectl_path"):$PATH"
fi
log "docker: ${DOCKER_HOST:-default engine}; kind: $(command -v kind); kubectl: $(command -v kubectl)"

# --- diagnostics and cleanup -------------------------------------------------------------
diagnostics() {
    log "diagnostics (the run failed)"
    kubectl get pods -A -o wide || true
    kubectl -n tether-system describe deployment/tether || true
    kubectl -n tether-system get lease tether-leader -o yaml || true
    kubectl -n tether-system logs -l app.kubernetes.io/name=tether --all-containers \
        --prefix --tail=200 || true
    kubectl get events -A --sort-by=.lastTimestamp | tail -n 60 || true
    if kind export logs "$STATE_DIR/logs" --name "$CLUSTER" >/dev/null 2>&1; then
        echo "full node logs: $STATE_DIR/logs" >&2
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT
    stage_end
    if ((rc != 0)); then diagnostics; fi
    if [[ "$KEEP_CLUSTER" == 1 ]]; then
        log "KEEP_CLUSTER=1: cluster '$CLUSTER' left running (KUBECONFIG=$KUBECONFIG${DOCKER_HOST:+, DOCKER_HOST=$DOCKER_HOST});" \
            "delete it with: kind delete cluster --name $CLUSTER"
    else
        log "deleting cluster '$CLUSTER'"
        timeout 180 kind delete cluster --name "$CLUSTER" || true
        rm -f "$KUBECONFIG"
        if ((ENGINE_STARTED)); then "$ROOT/scripts/kind/engine.sh" down || true; fi
    fi
    print_timings
    exit "$rc"
}
trap cleanup EXIT

# --- 1. node image and cluster ----------------------------------------------------------------
stage node-image
node_args=()
if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
    node_args=(--image "$KIND_NODE_IMAGE")
else
    pinned_node="$(awk '$1 == "image:" {print $2; exit}' kind-config.yaml)"
    if pullable "$pinned_node"; then
        log "node image: $pinned_node (kind-config.yaml)"
    else
        log "cannot pull $pinned_node: building a node image of Kubernetes $K8S_VERSION here"
        node_args=(--image "$("$ROOT/scripts/kind/images.sh" node)")
    fi
fi

stage cluster-up
reused=0
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "reusing kind cluster '$CLUSTER'"
    reused=1
    kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
else
    log "creating kind cluster '$CLUSTER' from kind-config.yaml ${node_args[*]}"
    kind create cluster --name "$CLUSTER" --config kind-config.yaml "${node_args[@]}" \
        --kubeconfig "$KUBECONFIG" --wait 300s
fi

# --- 2. the operator image -------------------------------------------------------------------
stage operator-image
"$ROOT/scripts/kind/operator-image.sh" "$IMAGE"
log "loading $IMAGE into the cluster"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# --- 3. Consul and etcd for the test ------------------------------------------------------------
stage install
service_images=("$(awk '$1 == "image:" {print $2}' scripts/kind/consul.yaml)"
                "$(awk '$1 == "image:" {print $2}' scripts/kind/etcd.yaml)")
if ! pullable "${service_images[0]}" || ! pullable "${service_images[1]}"; then
    log "cannot pull ${service_images[*]}: building them from the dev stack's programs"
    "$ROOT/scripts/kind/images.sh" services
fi
kind load docker-image "${service_images[@]}" --name "$CLUSTER"
log "deploying in-cluster Consul and etcd (scripts/kind/)"
kubectl apply -f scripts/kind/consul.yaml -f scripts/kind/etcd.yaml
kubectl -n consul rollout status deployment/consul-server --timeout=300s
kubectl -n etcd rollout status deployment/etcd --timeout=300s

# --- 4. Tether, as a user installs it --------------------------------------------------------------
# The ConfigMap patch that points tether-config at the Consul and etcd of step 3: the
# overlay's strategic-merge patch, applied in release mode as a JSON merge patch (the
# same keys, so both modes configure Tether identically).
KIND_CONFIG="scripts/kind/overlay/config.yaml"
if [[ "$INSTALL" == overlay ]]; then
    log "installing Tether: kubectl apply -k scripts/kind/overlay (manifests/ + local image)"
    kubectl apply -k scripts/kind/overlay
    kubectl wait --for=condition=Established --timeout=60s \
        crd/consulservices.tether.dev crd/etcdconfigs.tether.dev
    if ((reused)); then
        # Same tag, new image: only a restart makes the pods use the image just loaded.
        kubectl -n tether-system rollout restart deployment/tether
    fi
else
    # The release exactly as `make release` writes it for a user: no IMAGE=, no edits.
    log "rendering the release: scripts/release.sh ${RELEASE_DIR#"$ROOT"/}"
    rm -rf "$RELEASE_DIR"
    "$ROOT/scripts/release.sh" "$RELEASE_DIR"
    install_yaml="$RELEASE_DIR/install.yaml"
    # The one image the file names (the operator's Deployment; components are not in it).
    mapfile -t release_images < <(awk '$1 == "image:" {print $2}' "$install_yaml" | sort -u)
    ((${#release_images[@]} == 1)) \
        || die "install.yaml names ${#release_images[@]} images (${release_images[*]}), expected one"
    release_image="${release_images[0]}"
    # By digest only for an image pushed to a registry: a node without one cannot pull
    # it, and a digest cannot be given to a local build, so such a file is not testable here.
    [[ "$release_image" != *@* ]] \
        || die "install.yaml names $release_image by digest: kind can only serve it a tag"
    # The image just built, under the name install.yaml references: the node has it
    # (imagePullPolicy IfNotPresent) and never asks a registry.
    log "loading $IMAGE as $release_image, the image install.yaml names"
    docker tag "$IMAGE" "$release_image"
    kind load docker-image "$release_image" --name "$CLUSTER"

    log "installing Tether: kubectl apply -f ${install_yaml#"$ROOT"/} (the only install step)"
    kubectl apply -f "$install_yaml"
    kubectl wait --for=condition=Established --timeout=60s \
        crd/consulservices.tether.dev crd/etcdconfigs.tether.dev
    # Configuration, not installation: install.yaml is the same file for every
    # cluster, and its tether-config holds defaults that a user must set to their own
    # Consul and etcd (manifests/config.yaml says so: "Change them to your
    # endpoints"). A user edits that ConfigMap after applying the file; here the
    # same edit points it at step 3's Consul and etcd. The pods read tether-config
    # only at start (envFrom), and the Deployment started with the defaults, so a
    # restart follows, as that comment also tells the user.
    log "configuring Tether: tether-config patched from $KIND_CONFIG, then a rollout restart"
    kubectl -n tether-system patch configmap tether-config --type merge --patch-file "$KIND_CONFIG"
    kubectl -n tether-system rollout restart deployment/tether
fi
kubectl -n tether-system rollout status deployment/tether --timeout=300s
kubectl -n tether-system wait --for=condition=Available deployment/tether --timeout=120s

# --- 5. the tests ----------------------------------------------------------------------------------
stage tests
log "running tests/kind"
# TETHER_KIND_REQUIRED=1: here a missing cluster or tool fails the run; it is
# never silently skipped. -rP shows what passing tests printed: the failover times
# and the write counts of the rolling restart.
# TETHER_KIND_INSTALL_FILE: what the uninstall test deletes (`kubectl delete -f`);
# unset, it deletes the overlay (`kubectl delete -k`).
install_file=""
if [[ "$INSTALL" == release ]]; then install_file="$install_yaml"; fi
KIND_CLUSTER_NAME="$CLUSTER" TETHER_KIND_KUBECONFIG="$KUBECONFIG" TETHER_KIND_REQUIRED=1 \
    TETHER_KIND_INSTALL_FILE="$install_file" \
    "$PYTHON" -m pytest tests/kind -v -rsP -p no:cacheprovider "$@"
stage_end
