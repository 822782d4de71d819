#!/usr/bin/env bash
# Images for `make e2e-kind` on a machine where no container registry answers.
#
#   scripts/kind/images.sh node           build the kind node image; prints its name
#   scripts/kind/images.sh python-base    the operator image's base; prints its name
#   scripts/kind/images.sh services       hashicorp/consul and quay.io/coreos/etcd for
#                                         scripts/kind/{consul,etcd}.yaml
#
# Where a registry answers, none of this runs: scripts/e2e-kind.sh pulls the pinned
# upstream images and uses them. Everything here is built from pinned sources: Go
# programs from the build modules under devbin/ (compiled into the cache by
# scripts/kind/lib.sh), Debian packages by debootstrap (scripts/kind/rootfs.sh).
#
# The node image follows kind's node image contract, with files of its own under
# scripts/kind/node/: an entrypoint that prepares the container and execs systemd,
# containerd and the kubelet as systemd units, kubeadm, kubectl, /kind/version and
# /kind/manifests/default-{cni,storage}.yaml. Every image kubeadm v1.35 deploys is
# preloaded into the node's containerd under the name kubeadm gives it
# (`kubeadm config images list`), so creating a cluster pulls nothing:
#   - kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy: from the
#     pinned k8s.io/kubernetes (devbin/kubernetes, devbin/kubernetes-node);
#   - etcd 3.6.6 (devbin/kind-etcd), CoreDNS v1.13.1 (devbin/coredns), and pause
#     (devbin/pause, a small Go program with the pause contract);
# Each built image is tagged with a hash of its inputs: a rerun with the same pins
# reuses it.
set -euo pipefail
# shellcheck source=scripts/kind/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/kind/packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/packages.sh"

NODE_FILES="$KIND_ROOT/scripts/kind/node"
PAUSE_VERSION=3.10.1
ETCD_IMAGE_TAG=3.6.6-0
COREDNS_VERSION=v1.13.1
# The label that marks an image as built here rather than pulled.
BUILT_LABEL="dev.tether.built-locally=true"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# dev stack programs (kube-apiserver, kubectl, etcd, consul): built or found by
# devtools/tether_dev/binaries.py, which `make binaries` also runs.
devstack_bin() {
    local python="${PYTHON:-$KIND_ROOT/.venv/bin/python}"
    [[ -x "$python" ]] || python=python3
    # One program at a time: asking for all four would wait for (or build) the others.
    (cd "$KIND_ROOT/operator" && "$python" -c \
        'import sys; from tether_dev import binaries; print(binaries.ensure([sys.argv[1]])[sys.argv[1]])' "$1")
}

# import_rootfs NAME PACKAGES...: a docker image of a debootstrapped root filesystem.
import_rootfs() {
    local name=$1; shift
    local tar image
    tar="$("$KIND_ROOT/scripts/kind/rootfs.sh" "$name" "$@")"
    image="tether-kind/rootfs-$name:$(basename "$tar" .tar | sed "s/^$name-//")"
    if ! have_image "$image"; then
        log "importing $tar as $image"
        docker import --change "LABEL $BUILT_LABEL" "$tar" "$image" >/dev/null
    fi
    printf '%s\n' "$image"
}

# binary_image NAME BASE BINARY [ENTRYPOINT]: an image holding one program in
# /usr/local/bin on BASE ("scratch" for a static program).
binary_image() {
    local name=$1 base=$2 binary=$3 entrypoint=${4:-}
    local ctx
    ctx="$(mktemp -d)"
    cp "$binary" "$ctx/"
    {
        printf 'FROM %s\n' "$base"
        printf 'COPY %s /usr/local/bin/%s\n' "$(basename "$binary")" "$(basename "$binary")"
        printf 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n'
        printf 'LABEL %s\n' "$BUILT_LABEL"
        [[ -z "$entrypoint" ]] || printf 'ENTRYPOINT ["%s"]\n' "$entrypoint"
    } >"$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t "$name" "$ctx" >/dev/null 2>"$ctx/err" \
        || { cat "$ctx/err" >&2; rm -rf "$ctx"; die "docker build of $name failed"; }
    rm -rf "$ctx"
}

is_static() { ! file -L "$1" | grep -q 'dynamically linked'; }

# A base for programs that need the C library (a build with cgo) or tools
# (kube-proxy calls iptables and conntrack): the node's own root filesystem, so the
# layer is shared with the node image.
base_for() {
    if is_static "$1"; then echo scratch; else echo "$NODE_BASE"; fi
}

node() {
    command -v file >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q file >&2
    local k8s_bin cni_bin pause_bin coredns_bin etcd_bin runc_bin apiserver kubectl
    # Same settings as the dev stack's build of devbin/kubernetes (cgo as Go's default,
    # -trimpath), so the packages both share come out of Go's build cache: a separate
    # static build would compile all of Kubernetes again. Dynamically linked
    # programs go into images on the node's root filesystem (base_for).
    k8s_bin="$(gobuild kubernetes-node -- "-ldflags=$(kubernetes_ldflags)")"
    cni_bin="$(gobuild cni CGO_ENABLED=0)"
    pause_bin="$(gobuild pause CGO_ENABLED=0 -- -ldflags=-s)"
    coredns_bin="$(gobuild coredns CGO_ENABLED=0)"
    etcd_bin="$(gobuild kind-etcd CGO_ENABLED=0)"
    runc_bin="$(gobuild runc CGO_ENABLED=1 -- -tags seccomp)"
    apiserver="$(devstack_bin kube-apiserver)"
    kubectl="$(devstack_bin kubectl)"
    [[ -x "$apiserver" && -x "$kubectl" ]] || die "kube-apiserver/kubectl not found (make binaries)"

    NODE_BASE="$(import_rootfs node "${NODE_PACKAGES[@]}")"
    local stamp
    stamp="$( {
        echo "$NODE_BASE"
        for m in kubernetes kubernetes-node cni pause coredns kind-etcd runc; do module_stamp "$m"; done
        (cd "$NODE_FILES" && find . -type f | sort | xargs sha256sum)
        # Contents only: the path a script was called by must not change the stamp.
        cat "${BASH_SOURCE[0]}" "$KIND_ROOT/scripts/kind/lib.sh"
    } | sha256sum | cut -c1-12)"
    local image="tether-kind/node:$K8S_VERSION-$stamp"
    if have_image "$image"; then
        log "node image $image is built already"
        printf '%s\n' "$image"
        return
    fi

    log "building the images kubeadm $K8S_VERSION deploys"
    local -A images=(
        ["registry.k8s.io/kube-apiserver:$K8S_VERSION"]="$apiserver"
        ["registry.k8s.io/kube-controller-manager:$K8S_VERSION"]="$k8s_bin/kube-controller-manager"
        ["registry.k8s.io/kube-scheduler:$K8S_VERSION"]="$k8s_bin/kube-scheduler"
        ["registry.k8s.io/kube-proxy:$K8S_VERSION"]="$k8s_bin/kube-proxy"
        ["registry.k8s.io/etcd:$ETCD_IMAGE_TAG"]="$etcd_bin/server"
        ["registry.k8s.io/coredns/coredns:$COREDNS_VERSION"]="$coredns_bin/coredns"
        ["registry.k8s.io/pause:$PAUSE_VERSION"]="$pause_bin/pause"
    )
    local ctx name
    ctx="$(mktemp -d "$KIND_CACHE/.node-XXXXXX")"
    trap 'rm -rf "$ctx"' RETURN
    mkdir -p "$ctx/bins"
    for name in "${!images[@]}"; do
        local binary=${images[$name]} base entrypoint=""
        # Programs go in under the names the static Pod manifests call them by.
        case "$name" in
            */etcd:*) cp "$binary" "$ctx/bins/etcd"; binary="$ctx/bins/etcd" ;;
            */coredns:*) entrypoint=/usr/local/bin/coredns ;;
            */pause:*) entrypoint=/usr/local/bin/pause ;;
        esac
        if [[ "$name" == */kube-proxy:* ]]; then base="$NODE_BASE"; else base="$(base_for "$binary")"; fi
        binary_image "$name" "$base" "$binary" "$entrypoint"
        log "  $name (on ${base%%:*})"
    done
    # CoreDNS's image runs as root in kind; its Deployment from kubeadm names no
    # command, so the entrypoint must start it. pause likewise.

    log "preloading them into a containerd content store for the node"
    docker save -o "$ctx/images.tar" "${!images[@]}"
    preload "$ctx/images.tar" "$ctx/containerd"
    rm -f "$ctx/images.tar"

    log "assembling the node image $image"
    mkdir -p "$ctx/files/usr/bin" "$ctx/files/usr/local/sbin" "$ctx/files/opt/cni/bin" "$ctx/files/kind"
    cp -a "$NODE_FILES/." "$ctx/files/"
    cp "$k8s_bin/kubelet" "$k8s_bin/kubeadm" "$kubectl" "$ctx/files/usr/bin/"
    cp "$runc_bin/runc" "$ctx/files/usr/local/sbin/runc"
    cp "$cni_bin/"* "$ctx/files/opt/cni/bin/"
    echo "$K8S_VERSION" >"$ctx/files/kind/version"
    cat >"$ctx/Dockerfile" <<EOF
FROM $NODE_BASE
COPY files/ /
COPY containerd/ /var/lib/containerd/
# The units this node runs; the ones that make no sense in a container are masked.
RUN systemctl enable containerd.service kubelet.service \\
    && systemctl mask systemd-binfmt.service getty.target console-getty.service \\
        systemd-networkd-wait-online.service systemd-udevd.service systemd-modules-load.service \\
    && ln -sf /usr/local/sbin/runc /usr/sbin/runc
ENV container=docker
LABEL $BUILT_LABEL
# systemd's own signal for a clean shutdown.
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
EOF
    DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" >/dev/null
    log "node image $image built"
    printf '%s\n' "$image"
}

# preload TAR DIR: import the images of a `docker save` archive into a containerd
# content store rooted at DIR (namespace k8s.io, where the CRI plugin looks), by a
# short-lived containerd of the host's. The node runs Debian's containerd of the
# same release, so the store's format is the one it reads. Layers are not unpacked
# (no snapshotter work at build time); the CRI plugin unpacks an image when a
# container first uses it.
preload() {
    local archive=$1 root=$2
    local state
    state="$(mktemp -d /run/tether-preload-XXXXXX)"
    mkdir -p "$root"
    cat >"$state/config.toml" <<EOF
version = 2
root = "$root"
state = "$state/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$state/containerd.sock"
EOF
    containerd --config "$state/config.toml" >"$state/log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 50); do
        ctr --address "$state/containerd.sock" version >/dev/null 2>&1 && break
        sleep 0.2
    done
    if ! ctr --address "$state/containerd.sock" -n k8s.io images import --no-unpack --all-platforms \
        "$archive" >&2; then
        kill "$pid"; wait "$pid" || true
        cat "$state/log" >&2
        die "importing the images into containerd failed"
    fi
    ctr --address "$state/containerd.sock" -n k8s.io images ls -q >&2
    kill "$pid"
    wait "$pid" || true
    rm -rf "$state"
}

# The operator image's base: Debian's Python 3.11 on a debootstrapped bookworm. The
# image's build installs the operator's dependencies from PyPI; where this machine
# reaches PyPI through a TLS-inspecting proxy, its local CAs (Debian's place for
# them: /usr/local/share/ca-certificates) are what make that work, so the base
# trusts them too, and PIP_CERT points pip (which otherwise trusts only its own
# bundle) at the system's.
python_base() {
    local rootfs ctx stamp image
    rootfs="$(import_rootfs python "${PYTHON_PACKAGES[@]}")"
    ctx="$(mktemp -d)"
    mkdir -p "$ctx/ca"
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/"
    fi
    stamp="$( { echo "$rootfs"; cat "$ctx/ca/"* 2>/dev/null || true; } | sha256sum | cut -c1-12)"
    image="tether-kind/python-base:3.11-bookworm-$stamp"
    if ! have_image "$image"; then
        cat >"$ctx/Dockerfile" <<EOF
FROM $rootfs
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
LABEL $BUILT_LABEL
EOF
        DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" >/dev/null
        log "built the Python base $image"
    fi
    rm -rf "$ctx"
    printf '%s\n' "$image"
}

# The in-cluster Consul and etcd of scripts/kind/, under the names those manifests
# use, from the programs the dev stack builds (the same releases).
services() {
    local consul etcd
    consul="$(devstack_bin consul)"
    etcd="$(devstack_bin etcd)"
    NODE_BASE="$(import_rootfs node "${NODE_PACKAGES[@]}")"
    binary_image hashicorp/consul:1.16.3 "$(base_for "$consul")" "$consul" /usr/local/bin/consul
    binary_image quay.io/coreos/etcd:v3.6.16 "$(base_for "$etcd")" "$etcd"
    log "built hashicorp/consul:1.16.3 and quay.io/coreos/etcd:v3.6.16"
}

case "${1:-}" in
    node) node ;;
    python-base) python_base ;;
    services) services ;;
    *) die "usage: $0 node|python-base|services" ;;
esac
