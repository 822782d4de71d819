#!/usr/bin/env bash
# `make run`: bring the dev stack up, install CRDs and samples, run the operator.
set -euo pipefail
cd "$(dirname "$0")/.."
TETHER=.venv/bin/tether
echo "==> starting the dev stack (kube-apiserver, etcd x2, Consul); first run builds the binaries"
"$TETHER" dev up
# shellcheck disable=SC1091
source .tether/dev/env
echo "==> applying sample resources from manifests/samples/"
kubectl apply -k manifests/samples/
echo "==> running the operator (Ctrl-C to stop). In another shell:"
echo "      source .tether/dev/env; kubectl get tether -A"
echo "      curl -s \$CONSUL_HTTP_ADDR/v1/agent/services"
exec "$TETHER" run -A --metrics-port "${METRICS_PORT:-9090}" --health-port "${HEALTH_PORT:-9091}"
