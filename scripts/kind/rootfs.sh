#!/usr/bin/env bash
# Build a Debian bookworm root filesystem with debootstrap, as a tarball in the cache,
# for images that cannot be pulled here (no container registry is reachable):
#
#   scripts/kind/rootfs.sh NAME PACKAGE...     prints the path of the tarball
#
# The tarball is named after NAME and a hash of the package list, so it is built once
# per list. debootstrap fetches from Debian's archive (the one package source this
# machine reaches); `--variant=minbase` keeps it to essential packages plus the ones
# asked for. apt's lists and package cache are dropped: images built from the tarball
# install nothing more.
set -euo pipefail
# shellcheck source=scripts/kind/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# >= 1)) || die "usage: $0 NAME [PACKAGE...]"
name=$1; shift
package_list="$(printf '%s\n' "$@" | sort -u | paste -sd, -)"
stamp="$(printf 'bookworm minbase %s' "$package_list" | sha256sum | cut -c1-12)"
out="$KIND_CACHE/rootfs/$name-$stamp.tar"
if [[ -f "$out" ]]; then
    printf '%s\n' "$out"
    exit 0
fi
command -v debootstrap >/dev/null || {
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2
}
mkdir -p "$KIND_CACHE/rootfs"
work="$(mktemp -d "$KIND_CACHE/rootfs/.build-$name-XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "debootstrap bookworm ($name: ${package_list:-minbase only}); about 1-3 min"
started=$SECONDS
debootstrap --variant=minbase ${package_list:+--include="$package_list"} \
    bookworm "$work/root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
chroot "$work/root" apt-get clean
rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/cache/apt/"*.bin
# The host's name and resolver must not be baked in: the container runtime provides both.
: >"$work/root/etc/hostname"
rm -f "$work/root/etc/resolv.conf"
tar -C "$work/root" --numeric-owner -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$out"
log "root filesystem $name built in $((SECONDS - started)) s: $out ($(du -h "$out" | cut -f1))"
printf '%s\n' "$out"
