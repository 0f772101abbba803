#!/usr/bin/env bash
# Builds (once) a Debian bookworm podman image that can boot systemd as PID 1, for tests
# that need a real service manager. Besides systemd it has procps (/bin/kill, which the
# units' ExecReload= uses, as on any standard Debian system). No container registry is reachable here, so the image
# is made from a debootstrap'd rootfs; it is cached by name and rebuilt only with --rebuild.
#
# Usage: tests/scripts/build-base-image.sh [--rebuild] [IMAGE]
#   IMAGE defaults to $BST_BASE_IMAGE or localhost/bst-systemd-base:bookworm-HASH, where HASH
#   stands for the package list, so a changed list never reuses a stale image.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian),
#              BASE_IMAGE_PACKAGES (extra comma-separated packages to include).
# Prints the image name on stdout when done; progress goes to stderr.
set -euo pipefail

rebuild=no
if [[ ${1:-} == --rebuild ]]; then
    rebuild=yes
    shift
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages="systemd,systemd-sysv,dbus,procps${BASE_IMAGE_PACKAGES:+,$BASE_IMAGE_PACKAGES}"
hash=$(printf '%s' "$packages" | sha256sum | cut -c1-10)
image=${1:-${BST_BASE_IMAGE:-localhost/bst-systemd-base:bookworm-$hash}}

log() { echo "build-base-image: $*" >&2; }

[[ $(id -u) == 0 ]] || { log "must run as root (debootstrap)"; exit 2; }

# On these VMs crun fails on the hybrid cgroup layout and root cannot raise rlimits:
# setup-podman.sh (shared with the container tests) writes the tests' own containers.conf
# and podman here uses it through CONTAINERS_CONF (nothing under /etc is changed).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$here/../.." && pwd)/target/podman/containers.conf}
"$here/setup-podman.sh" >&2

for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { log "$tool is not installed (apt-get install $tool)"; exit 2; }
done

# Serialise concurrent callers: two tests may ask for the image at once.
exec 9>/run/lock/bst-build-base-image.lock 2>/dev/null || exec 9>/tmp/bst-build-base-image.lock
flock 9

if [[ $rebuild == no ]] && podman image exists "$image"; then
    log "$image already exists"
    echo "$image"
    exit 0
fi

rootfs=$(mktemp -d /var/tmp/bst-base-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap bookworm ($packages) into $rootfs"
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >&2

# Trim what a booted test container does not need and what would slow or confuse its boot.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
: >"$rootfs/etc/machine-id"
ln -sf /lib/systemd/systemd "$rootfs/sbin/init"
# getty on a console that does not exist only produces restart noise.
systemctl --root="$rootfs" mask getty.target console-getty.service \
    systemd-firstboot.service >/dev/null 2>&1 || true

log "importing as $image"
tar -C "$rootfs" -c . | podman import \
    --change 'CMD ["/lib/systemd/systemd"]' \
    --change 'STOPSIGNAL SIGRTMIN+3' - "$image" >&2
echo "$image"
