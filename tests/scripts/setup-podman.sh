#!/usr/bin/env bash
# Makes podman usable for the container tests on a Debian 12 machine, as root:
#   - installs podman, buildah, runc, slirp4netns and uidmap when podman, buildah or runc
#     is missing (apt-get update runs only then);
#   - writes the tests' own containers.conf, $CONTAINERS_CONF or else
#     <repo>/target/podman/containers.conf, with the settings these VMs need (crun fails on
#     their hybrid cgroup layout, so runc; root cannot raise rlimits, so fixed ulimits; no
#     systemd as PID 1, so cgroupfs and file events). Nothing under /etc is touched: podman
#     reads this file only where CONTAINERS_CONF names it (the tests and run-all.sh do), so
#     the machine's own podman keeps its configuration.
# A second run changes nothing.
#
# Usage: tests/scripts/setup-podman.sh [--check]
#   --check  only report (exit 1) what is missing; install nothing.
# Exit status: 0 ready, 1 something is missing or failed, 2 not root (and not ready).
set -euo pipefail

log() { echo "setup-podman: $*" >&2; }

check_only=no
[[ ${1:-} == --check ]] && check_only=yes

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
conf=${CONTAINERS_CONF:-$repo_root/target/podman/containers.conf}
export CONTAINERS_CONF=$conf
missing=()
for tool in podman buildah runc; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done

if [[ ${#missing[@]} -eq 0 && -e $conf ]]; then
    exit 0
fi
if [[ $check_only == yes ]]; then
    [[ ${#missing[@]} -gt 0 ]] && log "missing: ${missing[*]}"
    [[ -e $conf ]] || log "missing: $conf"
    exit 1
fi
if [[ $(id -u) != 0 ]]; then
    log "not root: cannot install ${missing[*]:-} or write $conf"
    exit 2
fi

if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing podman buildah runc slirp4netns uidmap (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # Serialise with any other apt user on the machine rather than failing on its lock.
    apt_opts=(-q -o DPkg::Lock::Timeout=300)
    apt-get "${apt_opts[@]}" update
    apt-get "${apt_opts[@]}" install -y podman buildah runc slirp4netns uidmap
fi

if [[ ! -e $conf ]]; then
    log "writing $conf (runc, cgroupfs, file events, fixed ulimits)"
    mkdir -p "$(dirname "$conf")"
    # Written to a temporary name first, so a concurrent reader never sees half a file.
    tmp=$(mktemp "$(dirname "$conf")/.containers.conf.XXXXXX")
    cat >"$tmp" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    chmod 0644 "$tmp"
    mv -n "$tmp" "$conf"
    rm -f "$tmp"
fi

# One cheap call that fails when podman cannot work at all (storage, configuration).
if ! podman info >/dev/null 2>&1; then
    log "podman is installed but 'podman info' fails:"
    podman info >&2 || true
    exit 1
fi
