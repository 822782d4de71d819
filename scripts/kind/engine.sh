#!/usr/bin/env bash
# A Docker engine for `make e2e-kind`: the one already reachable, or one this script
# starts itself from pinned builds.
#
#   scripts/kind/engine.sh up      use a reachable engine, else start one; prints the
#                                  DOCKER_HOST to export (empty for the default engine)
#   scripts/kind/engine.sh down    stop the engine this script started (nothing else)
#   scripts/kind/engine.sh status
#
# Why an engine of our own: Debian's docker.io (20.10) cannot run `--privileged`
# containers on hosts whose capability bounding set lacks a capability it knows (it
# asks for all of them), and kind always runs its nodes privileged. A current dockerd
# asks only for the capabilities that exist. So, when no engine answers, this builds
# dockerd (devbin/dockerd) and runc (devbin/runc; Debian's runc 1.1 is too old for the
# new engine) from the Go module proxy into the cache, and starts dockerd with its
# own data root, exec root and socket under $TETHER_CACHE/docker, next to nothing of
# the system's. containerd and its shim come from Debian (installed when missing);
# dockerd starts and stops its own containerd.
#
# --userland-proxy=false: published ports (kind's API server port on 127.0.0.1) are
# forwarded by iptables rules instead of a docker-proxy process per port.
set -euo pipefail
# shellcheck source=scripts/kind/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ENGINE_DIR="$TETHER_CACHE/docker"
RUN_DIR="$ENGINE_DIR/run"
SOCKET="$RUN_DIR/docker.sock"
PIDFILE="$RUN_DIR/dockerd.pid"
ENGINE_LOG="$ENGINE_DIR/dockerd.log"
# How long dockerd may take to answer after it starts (it starts containerd first).
START_TIMEOUT=90

engine_answers() { timeout 20 docker "$@" info >/dev/null 2>&1; }

ours_running() {
    [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

apt_install() {
    log "installing Debian packages: $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; then
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
    fi
}

# Programs the started engine needs, installed or built when missing.
prepare() {
    if ! command -v docker >/dev/null; then
        # Only the CLI is used from this package; its own (old) dockerd is never started.
        apt_install docker.io
    fi
    if ! command -v containerd >/dev/null || ! command -v containerd-shim-runc-v2 >/dev/null; then
        apt_install containerd
    fi
    command -v iptables >/dev/null || apt_install iptables
    [[ -e /usr/include/seccomp.h ]] || apt_install libseccomp-dev pkg-config
    RUNC_DIR="$(gobuild runc CGO_ENABLED=1 -- -tags seccomp)"
    DOCKERD_DIR="$(gobuild dockerd CGO_ENABLED=0)"
}

up() {
    if [[ -z "${DOCKER_HOST:-}" ]] && engine_answers; then
        log "using the Docker engine that is already running"
        echo ""
        return
    fi
    if ours_running && engine_answers -H "unix://$SOCKET"; then
        log "using the Docker engine started earlier (pid $(cat "$PIDFILE"))"
        echo "unix://$SOCKET"
        return
    fi
    log "no Docker engine answers: starting one from pinned builds (devbin/dockerd, devbin/runc)"
    prepare
    mkdir -p "$RUN_DIR" "$ENGINE_DIR/data"
    rm -f "$SOCKET" "$PIDFILE"
    # The built runc first on PATH: dockerd, its containerd and the shims all look
    # up "runc" there.
    PATH="$RUNC_DIR:$DOCKERD_DIR:$PATH" nohup setsid "$DOCKERD_DIR/dockerd" \
        --host "unix://$SOCKET" \
        --data-root "$ENGINE_DIR/data" \
        --exec-root "$RUN_DIR/exec" \
        --pidfile "$PIDFILE" \
        --userland-proxy=false \
        >"$ENGINE_LOG" 2>&1 </dev/null &
    local deadline=$((SECONDS + START_TIMEOUT))
    until engine_answers -H "unix://$SOCKET"; do
        if ((SECONDS > deadline)); then
            tail -n 30 "$ENGINE_LOG" >&2
            die "dockerd did not answer within ${START_TIMEOUT}s (log: $ENGINE_LOG)"
        fi
        sleep 1
    done
    log "dockerd is up (pid $(cat "$PIDFILE"), socket $SOCKET, log $ENGINE_LOG)"
    echo "unix://$SOCKET"
}

down() {
    if ! ours_running; then
        log "no engine started by this script is running"
        return
    fi
    local pid
    pid="$(cat "$PIDFILE")"
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    # dockerd stops its containers and its containerd first; give it time.
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            log "dockerd still running after 60 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 1
    done
    rm -f "$PIDFILE"
}

status() {
    if ours_running; then
        echo "dockerd started by this script: pid $(cat "$PIDFILE"), DOCKER_HOST=unix://$SOCKET"
    elif [[ -z "${DOCKER_HOST:-}" ]] && engine_answers; then
        echo "a Docker engine not started by this script is running"
    else
        echo "no Docker engine"
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
