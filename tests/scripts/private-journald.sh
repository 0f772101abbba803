#!/usr/bin/env bash
# Runs a command next to a real systemd-journald that nobody else sees, then dumps what the
# journal received as `journalctl -o json` lines. Needs root (a private mount namespace);
# nothing on the host (its /run, its journal) is touched.
#
# Usage: tests/scripts/private-journald.sh [--without-journald] OUT.json -- COMMAND [ARGS...]
#   --without-journald  same private /run, but no journald: for testing the fallback.
# Exit status: COMMAND's. OUT.json is written in either case (empty without journald).
set -euo pipefail

if [[ ${BST_PRIVATE_JOURNALD_INSIDE:-} != 1 ]]; then
    [[ $(id -u) == 0 ]] || { echo "private-journald: must run as root" >&2; exit 2; }
    command -v unshare >/dev/null || { echo "private-journald: unshare missing" >&2; exit 2; }
    export BST_PRIVATE_JOURNALD_INSIDE=1
    exec unshare --mount --propagation private -- "$BASH" "$0" "$@"
fi

with_journald=yes
if [[ ${1:-} == --without-journald ]]; then
    with_journald=no
    shift
fi
out=${1:?usage: $0 [--without-journald] OUT.json -- COMMAND...}
shift
[[ ${1:-} == -- ]] && shift
(($#)) || { echo "private-journald: no command" >&2; exit 2; }

journald=
for candidate in /lib/systemd/systemd-journald /usr/lib/systemd/systemd-journald; do
    [[ -x $candidate ]] && journald=$candidate && break
done
[[ -n $journald || $with_journald == no ]] || { echo "private-journald: systemd-journald missing" >&2; exit 2; }

# A private /run holds the sockets and the volatile journal; a private /var/log/journal keeps
# journald from ever writing into the host's persistent journal.
mount -t tmpfs -o mode=0755 tmpfs /run
if [[ -d /var/log/journal ]]; then
    mount -t tmpfs -o mode=2755 tmpfs /var/log/journal
fi
mkdir -p /run/systemd/journal /run/log/journal

jpid=
cleanup() {
    if [[ -n $jpid ]]; then
        kill "$jpid" 2>/dev/null || true
        wait "$jpid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [[ $with_journald == yes ]]; then
    "$journald" </dev/null >/dev/null 2>&1 &
    jpid=$!
    for _ in $(seq 100); do
        [[ -S /run/systemd/journal/socket && -S /run/systemd/journal/stdout ]] && break
        kill -0 "$jpid" 2>/dev/null || { echo "private-journald: journald exited" >&2; exit 2; }
        sleep 0.05
    done
    [[ -S /run/systemd/journal/socket ]] || { echo "private-journald: no journal socket" >&2; exit 2; }
fi

status=0
"$@" || status=$?

: >"$out"
if [[ $with_journald == yes ]]; then
    journalctl --sync >/dev/null 2>&1 || sleep 0.5
    journalctl -D /run/log/journal -o json --no-pager >"$out"
fi
exit "$status"
