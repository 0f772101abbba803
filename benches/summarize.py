#!/usr/bin/env python3
"""Turns the JSON lines of benches/compare.sh (results.jsonl) into a table of ratios.

    python3 benches/summarize.py target/bench-results/<date>/results.jsonl

Every result's label is SERVER:CASE:REPETITION. Within one repetition every server ran
the case back to back, so ratios are computed per repetition and the median of those is
shown (the machine is shared and noisy; pairing in time cancels most of the drift).
Absolute figures are medians over repetitions.
"""

import json
import statistics
import sys
from collections import defaultdict

SERVERS = ["ours", "reference", "casd"]
# Present when compare.sh ran a `before` build too (BENCH_BEFORE_BIN).
BEFORE = "before"

# scenario -> [(field, description, higher_is_better)]
METRICS = {
    "bytestream-upload": [("mb_per_s", "MB/s", True)],
    "bytestream-download": [("mb_per_s", "MB/s", True)],
    "batch-update": [("blobs_per_s", "blobs/s", True)],
    "batch-read": [("blobs_per_s", "blobs/s", True)],
    "find-missing": [("digests_per_s", "digests/s", True)],
    "asset-roundtrip": [("roundtrips_per_s", "round trips/s", True)],
    "artifact": [
        ("push_files_per_s", "push files/s", True),
        ("pull_files_per_s", "pull files/s", True),
    ],
    "bst-pull": [("seconds", "bst pull s", False)],
}
# scenario -> [(cpu field, ops field)] for server CPU per operation
CPU = {
    "artifact": [("push_server_cpu_s", "push_files"), ("pull_server_cpu_s", "pull_files")],
    "bst-pull": [("server_cpu_s", "files")],
}
OPS = {
    "bytestream-upload": "bytes",
    "bytestream-download": "bytes",
    "batch-update": "blobs",
    "batch-read": "blobs",
    "find-missing": "digests",
    "asset-roundtrip": "roundtrips",
}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=3):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def cpu_per_op(r):
    sc = r["scenario"]
    pairs = CPU.get(sc) or [("server_cpu_s", OPS.get(sc))]
    out = []
    for cpu, ops in pairs:
        c, n = r.get(cpu), r.get(ops) if ops else None
        out.append(c / n if c is not None and n else None)
    return out


def main(path):
    rows = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
    by = defaultdict(lambda: defaultdict(dict))  # case -> rep -> server -> record
    for r in rows:
        parts = r.get("label", "").split(":")
        if len(parts) != 3:
            continue
        server, case, rep = parts
        by[case][rep][server] = r

    machine = by.pop("sha256", {}), by.pop("disk-write", {})
    sha = {rep: v["machine"]["mb_per_s"] for rep, v in machine[0].items()}
    disk = {rep: v["machine"]["mb_per_s"] for rep, v in machine[1].items()}
    print("Machine (median over repetitions):")
    print(f"  single-core SHA-256: {fmt(med(sha.values()))} MB/s")
    print(f"  buffered write of new files: {fmt(med(disk.values()))} MB/s")
    print()

    servers = SERVERS + ([BEFORE] if any(BEFORE in v for reps in by.values()
                                         for v in reps.values()) else [])
    others = [s for s in servers if s != "ours"]
    short = {"reference": "ref", "casd": "casd", BEFORE: "before"}
    head = (["case", "metric"] + servers + [f"ours/{short[o]}" for o in others] +
            [f"cpu/op ours/{short[o]}" for o in others])
    table = []
    for case in sorted(by):
        reps = by[case]
        any_rec = next(iter(next(iter(reps.values())).values()))
        sc = any_rec["scenario"]
        if sc not in METRICS or case.startswith("tls") or case == "startup":
            continue
        for mi, (field, desc, higher) in enumerate(METRICS[sc]):
            vals = {s: med(v[s].get(field) for v in reps.values() if s in v) for s in servers}
            ratios = {}
            cpu_ratios = {}
            for other in others:
                rs, cs = [], []
                for v in reps.values():
                    if "ours" in v and other in v:
                        a, b = v["ours"].get(field), v[other].get(field)
                        if a and b:
                            rs.append(a / b if higher else b / a)
                        ca = cpu_per_op(v["ours"])
                        cb = cpu_per_op(v[other])
                        if mi < len(ca) and ca[mi] and cb[mi]:
                            cs.append(ca[mi] / cb[mi])
                ratios[other] = med(rs)
                cpu_ratios[other] = med(cs)
            table.append([case, desc] + [fmt(vals[s]) for s in servers] +
                         [fmt(ratios[o]) for o in others] + [fmt(cpu_ratios[o]) for o in others])
    widths = [max(len(str(r[i])) for r in table + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    print("Throughput (ours/x > 1: ours is faster; for 'bst pull s' it is x's time / ours)")
    print("and server CPU per operation (cpu/op ours/x < 1: ours uses less):")
    print(line(head))
    for r in table:
        print(line(r))
    print()

    # TLS against plain, same server, same repetition.
    tls = [c for c in by if c.startswith("tls-") and not c.startswith("tls-base-")]
    if tls:
        print("TLS (ours with TLS / ours without, same repetition):")
        for c in sorted(tls):
            base = "tls-base-" + c[len("tls-"):]
            sc = next(iter(next(iter(by[c].values())).values()))["scenario"]
            field = METRICS[sc][0][0]
            rs = [by[c][rep]["ours"][field] / by[base][rep]["ours"][field]
                  for rep in by[c] if rep in by.get(base, {})]
            print(f"  {c[4:]}: {fmt(med(rs))}")
        print()

    print("Targets:")
    def target(name, value, ok, detail):
        status = "-" if value is None else ("MET" if ok else "MISSED")
        print(f"  [{status}] {name}: {detail}")

    def paired(case, f):
        out = []
        for rep, v in by.get(case, {}).items():
            x = f(rep, v)
            if x is not None:
                out.append(x)
        return med(out)

    bu = paired("batch-update-8", lambda rep, v: v["ours"]["blobs_per_s"] / v["reference"]["blobs_per_s"]
                if "ours" in v and "reference" in v else None)
    target("BatchUpdateBlobs 4 KiB x8 >= 20x the reference's blobs/s", bu, bu is not None and bu >= 20,
           f"{fmt(bu)}x")
    ceiling = paired("batch-update-8-stored",
                     lambda rep, v: v["ours"]["blobs_per_s"] / by["batch-update-8"][rep]["reference"]["blobs_per_s"]
                     if "ours" in v and "reference" in by.get("batch-update-8", {}).get(rep, {}) else None)
    if ceiling is not None:
        print(f"      (ceiling: the same upload of blobs ours already stores, so no file is created,"
              f" is {fmt(ceiling)}x the reference's rate for new blobs)")
    up = paired("upload-1", lambda rep, v: v["ours"]["mb_per_s"] / sha[rep]
                if "ours" in v and rep in sha else None)
    up_disk = paired("upload-1", lambda rep, v: v["ours"]["mb_per_s"] / disk[rep]
                     if "ours" in v and rep in disk else None)
    target("single-stream upload >= 60% of single-core SHA-256", up, up is not None and up >= 0.6,
           f"{fmt(None if up is None else up * 100)}% of SHA-256 "
           f"({fmt(None if up_disk is None else up_disk * 100)}% of the buffered-write rate)")
    dn = paired("download-1", lambda rep, v: v["ours"]["per_stream_mb_per_s"] if "ours" in v else None)
    target("download >= 1 GB/s per stream", dn, dn is not None and dn >= 1000, f"{fmt(dn)} MB/s")
    fm = max([x for x in (paired(c, lambda rep, v: v["ours"]["digests_per_s"] if "ours" in v else None)
                          for c in ("find-missing-1", "find-missing-4")) if x is not None], default=None)
    target("FindMissingBlobs >= 1M digests/s (10,000-digest requests)", fm,
           fm is not None and fm >= 1e6, f"{fmt(fm)} digests/s")
    big = [c for c in by if c.startswith("big-upload")]
    for c in big:
        r = next(iter(by[c].values()))["ours"]
        kb = r.get("server_rss_max_kb")
        mb = None if kb is None else kb * 1024 / 1e6
        target(f"peak RSS < 150 MB during {c} (concurrent uploads)", mb, mb is not None and mb < 150,
               f"{fmt(mb)} MB peak RSS (VmHWM {fmt((r.get('server_hwm_kb') or 0) * 1024 / 1e6)} MB), "
               f"{fmt(r.get('mb_per_s'))} MB/s aggregate")
    bp = by.get("bst-pull", {})
    if bp:
        t = paired("bst-pull", lambda rep, v: v["ours"]["seconds"] / v["reference"]["seconds"]
                   if "ours" in v and "reference" in v else None)
        c = paired("bst-pull", lambda rep, v: v["ours"]["server_cpu_s"] / v["reference"]["server_cpu_s"]
                   if "ours" in v and "reference" in v and v["reference"]["server_cpu_s"] else None)
        target("bst artifact pull not slower than against the reference", t, t is not None and t <= 1.0,
               f"time ours/ref = {fmt(t)}")
        target("server CPU of that pull <= 1/4 of the reference's", c, c is not None and c <= 0.25,
               f"CPU ours/ref = {fmt(c)}")
    st = by.get("startup", {})
    if st:
        r = next(iter(st.values()))["ours"]
        print()
        print("Start-up on a repository of {} objects:".format(r.get("objects")))
        for k in ("first_get_capabilities_s", "first_find_missing_s", "rss_after_start_kb",
                  "scan_ms", "scan_done_s", "rss_after_scan_kb", "hwm_after_scan_kb",
                  "fmb_digests_per_s", "fmb_server_cpu_us_per_digest", "evict_freed_objects",
                  "evict_freed_bytes", "evict_s", "evict_objects_per_s", "evict_mb_per_s"):
            print(f"  {k}: {fmt(r.get(k), 4)}")


if __name__ == "__main__":
    main(sys.argv[1])
