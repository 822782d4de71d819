# shellcheck shell=bash disable=SC2034
# The Debian packages of the root filesystems built by scripts/kind/rootfs.sh
# (sourced). Changing a list builds that root filesystem afresh.

# The kind node: systemd as PID 1, Debian's containerd (with ctr, which kind uses to
# load images) and what kubeadm, the kubelet and kube-proxy call: mount tools,
# iptables/conntrack, iproute2, socat (port-forward), ethtool, kmod.
NODE_PACKAGES=(
    systemd systemd-sysv dbus libseccomp2 containerd
    iptables nftables conntrack iproute2 ethtool socat kmod
    util-linux mount procps ca-certificates libc-bin findutils
)

# The operator image's base when the pinned python image cannot be pulled: Debian's
# own Python 3.11 (the same minor version as the pinned base) with venv and pip.
PYTHON_PACKAGES=(python3 python3-venv python3-pip ca-certificates)
