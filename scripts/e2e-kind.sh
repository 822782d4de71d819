#!/usr/bin/env bash
# End-to-end run on kind, what `make e2e-kind` runs:
#
#   1. create a kind cluster from kind-config.yaml (or reuse one of that name);
#   2. build the operator image (`docker build`) and load it into the cluster;
#   3. deploy a throwaway Consul and etcd (scripts/kind/*.yaml);
#   4. install Tether exactly as a user would, `kubectl apply -k`, through the
#      overlay scripts/kind/overlay (local image, in-cluster endpoints);
#   5. wait for the Deployment, then run tests/kind against the cluster;
#   6. delete the cluster (keep it with KEEP_CLUSTER=1).
#
# Needs Docker (a running engine), kind v0.31.0+ and kubectl. The kubeconfig is
# written to .tether/kind/ and never touches ~/.kube/config.
#
# Environment:
#   KIND_CLUSTER_NAME  cluster name (default: tether-e2e)
#   KEEP_CLUSTER=1     leave the cluster running afterwards (a rerun reuses it)
#   PYTHON             interpreter with pytest (default: .venv/bin/python, else python3)
# Extra arguments are passed to pytest, e.g. scripts/e2e-kind.sh -k failover
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CLUSTER="${KIND_CLUSTER_NAME:-tether-e2e}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
# Must match "images:" in scripts/kind/overlay/kustomization.yaml.
IMAGE="tether:e2e"
STATE_DIR="$ROOT/.tether/kind"
export KUBECONFIG="$STATE_DIR/$CLUSTER.kubeconfig"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit 1; }

# --- prerequisites: fail early, saying what to install -----------------------
missing=()
command -v docker >/dev/null 2>&1 || missing+=("docker: install Docker, https://docs.docker.com/get-docker/")
command -v kind >/dev/null 2>&1 || missing+=("kind: install kind v0.31.0 or newer, e.g. go install sigs.k8s.io/kind@v0.31.0")
command -v kubectl >/dev/null 2>&1 || missing+=("kubectl: install kubectl v1.35, https://kubernetes.io/docs/tasks/tools/")
if ((${#missing[@]})); then
    printf 'e2e-kind: missing tools:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi
docker info >/dev/null 2>&1 \
    || die "docker is installed but its engine is not reachable (\`docker info\` failed): start Docker and retry"
"$PYTHON" -c 'import pytest' 2>/dev/null \
    || die "$PYTHON has no pytest: run \`pip install -e '.[dev]'\` (or set PYTHON=...)"

# --- the cluster ---------------------------------------------------------------
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
    if ((rc != 0)); then diagnostics; fi
    if [[ "$KEEP_CLUSTER" == 1 ]]; then
        log "KEEP_CLUSTER=1: cluster '$CLUSTER' left running (KUBECONFIG=$KUBECONFIG);" \
            "delete it with: kind delete cluster --name $CLUSTER"
    else
        log "deleting cluster '$CLUSTER'"
        kind delete cluster --name "$CLUSTER" || true
        rm -f "$KUBECONFIG"
    fi
    exit "$rc"
}
trap cleanup EXIT

mkdir -p "$STATE_DIR"
reused=0
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "reusing kind cluster '$CLUSTER'"
    reused=1
    kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
else
    log "creating kind cluster '$CLUSTER' from kind-config.yaml"
    kind create cluster --name "$CLUSTER" --config kind-config.yaml \
        --kubeconfig "$KUBECONFIG" --wait 180s
fi

# --- the image -------------------------------------------------------------------
log "building image $IMAGE"
docker build -t "$IMAGE" .
log "loading $IMAGE into the cluster"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# --- Consul and etcd for the test ---------------------------------------------------
log "deploying in-cluster Consul and etcd (scripts/kind/)"
kubectl apply -f scripts/kind/consul.yaml -f scripts/kind/etcd.yaml
kubectl -n consul rollout status deployment/consul-server --timeout=300s
kubectl -n etcd rollout status deployment/etcd --timeout=300s

# --- Tether, as a user installs it -----------------------------------------------------
log "installing Tether: kubectl apply -k scripts/kind/overlay (manifests/ + local image)"
kubectl apply -k scripts/kind/overlay
kubectl wait --for=condition=Established --timeout=60s \
    crd/consulservices.tether.dev crd/etcdconfigs.tether.dev
if ((reused)); then
    # Same tag, new image: only a restart makes the pods use the image just loaded.
    kubectl -n tether-system rollout restart deployment/tether
fi
kubectl -n tether-system rollout status deployment/tether --timeout=300s
kubectl -n tether-system wait --for=condition=Available deployment/tether --timeout=120s

# --- the tests ----------------------------------------------------------------------------
log "running tests/kind"
# TETHER_KIND_REQUIRED=1: here a missing cluster or tool fails the run; it is
# never silently skipped.
KIND_CLUSTER_NAME="$CLUSTER" TETHER_KIND_KUBECONFIG="$KUBECONFIG" TETHER_KIND_REQUIRED=1 \
    "$PYTHON" -m pytest tests/kind -v -rs -p no:cacheprovider "$@"
