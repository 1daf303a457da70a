#!/usr/bin/env bash
# Memory figures of issue 16 (big images): dedup index bytes per stored copy, peak
# RSS on unique data, peak RSS of a sparse image against a dense one, and the
# writer thread's share of the CPU time.
#
# usage: scripts/big-images.sh [index|rss|sparse|share|all] [SIZE]
#
#   index   2 GiB (SIZE) of unique data at 4 KiB and 64 KiB clusters:
#           index-bytes / stored-copies and peak RSS (/usr/bin/time -v)
#   rss     BIG (default 16G) of unique data at 4 KiB clusters: peak RSS
#   sparse  a 4 TiB sparse raw with 1 GiB of data in 64 KiB pieces every 256 MiB
#           (8192 L2 tables at 64 KiB clusters) against a dense 1 GiB file: peak RSS
#   share   the 2 GiB (SIZE) mixed sample at -m 2, unsynced: CPU time of the writer
#           (main) thread against the whole process: each thread's own CPU clock
#           by role (QDEDUP_THREAD_CPU=1, no perf needed) and, where perf is
#           installed, perf record -e cpu-clock samples per thread name. ROUNDS
#           (default 3) runs.
#
# Environment: WORKDIR (default ${TMPDIR:-/tmp}/qdedup-big; every input and output
# is deleted after use), QDEDUP (a binary to measure instead of this tree's; one
# from before the I/O thread prints no thread-cpu lines), ROUNDS (share).
set -euo pipefail

MODE=${1:-all}
SIZE=${2:-2G}
BIG=${BIG:-16G}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/qdedup-big}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORKDIR"

(cd "$ROOT" && cargo build --release --quiet --bin qdedup --example gen_sample)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
QDEDUP=${QDEDUP:-$TARGET_DIR/release/qdedup}
GEN=$TARGET_DIR/release/examples/gen_sample

# rss_of CMD...: runs CMD under /usr/bin/time -v; prints its max RSS in MiB.
rss_of() {
    /usr/bin/time -v "$@" 2>"$WORKDIR/time.txt" >"$WORKDIR/report.json"
    awk '/Maximum resident/ {printf "%.1f", $6 / 1024}' "$WORKDIR/time.txt"
}

# convert_rss IN OPTS...: converts IN (unsynced, JSON report); prints figures.
convert_rss() {
    local in=$1
    shift
    local rss
    rss=$(rss_of "$QDEDUP" convert --no-sync --output json "$@" "$in" "$WORKDIR/out.qcow2")
    python3 - "$WORKDIR/report.json" "$rss" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
n = r["stored-copies"]
print(f"   cluster {r['cluster-size']}: stored-copies {n}, index-bytes {r['index-bytes']}"
      f" ({r['index-bytes'] / max(n, 1):.2f} per copy), {r['seconds']:.1f} s,"
      f" peak RSS {sys.argv[2]} MiB")
PY
    qemu-img check -q "$WORKDIR/out.qcow2"
    rm -f "$WORKDIR/out.qcow2"
}

index() {
    echo "== $SIZE of unique data"
    "$GEN" "$WORKDIR/unique.raw" "$SIZE" random 3
    convert_rss "$WORKDIR/unique.raw" -o cluster_size=4k
    convert_rss "$WORKDIR/unique.raw" -o cluster_size=64k
    rm -f "$WORKDIR/unique.raw"
}

rss() {
    echo "== $BIG of unique data at 4 KiB clusters"
    "$GEN" "$WORKDIR/big.raw" "$BIG" random 4
    convert_rss "$WORKDIR/big.raw" -o cluster_size=4k
    rm -f "$WORKDIR/big.raw"
}

sparse() {
    echo "== 4 TiB sparse with 1 GiB of data against 1 GiB dense, 64 KiB clusters"
    python3 - "$WORKDIR/sparse.raw" "$WORKDIR/dense.raw" <<'PY'
import os, random, sys
rnd = random.Random(5)
piece, stride, n = 64 << 10, 256 << 20, 16384
with open(sys.argv[1], "wb") as s, open(sys.argv[2], "wb") as d:
    s.truncate(n * stride)
    for i in range(n):
        b = rnd.randbytes(piece)
        s.seek(i * stride)
        s.write(b)
        d.write(b)
PY
    convert_rss "$WORKDIR/sparse.raw" -o cluster_size=64k
    convert_rss "$WORKDIR/dense.raw" -o cluster_size=64k
    rm -f "$WORKDIR/sparse.raw" "$WORKDIR/dense.raw"
}

share() {
    echo "== writer thread share, $SIZE mixed, -m 2, unsynced"
    "$GEN" "$WORKDIR/mixed.raw" "$SIZE" mixed
    local r
    for r in $(seq 1 "${ROUNDS:-3}"); do
        cat "$WORKDIR/mixed.raw" >/dev/null
        echo "-- run $r: per-thread CPU clocks (QDEDUP_THREAD_CPU=1)"
        QDEDUP_THREAD_CPU=1 "$QDEDUP" convert -q --no-sync -m 2 \
            "$WORKDIR/mixed.raw" "$WORKDIR/out.qcow2" 2>&1 | sed 's/^thread-cpu: /   /'
        rm -f "$WORKDIR/out.qcow2"
        if command -v perf >/dev/null; then
            echo "-- run $r: perf samples per thread"
            perf record -q -e cpu-clock -o "$WORKDIR/perf.data" -- \
                "$QDEDUP" convert -q --no-sync -m 2 "$WORKDIR/mixed.raw" "$WORKDIR/out.qcow2" 2>/dev/null
            perf report -i "$WORKDIR/perf.data" --sort comm --stdio 2>/dev/null | grep -E '^ +[0-9]'
            rm -f "$WORKDIR/out.qcow2" "$WORKDIR/perf.data"
        fi
    done
    rm -f "$WORKDIR/mixed.raw"
}

case $MODE in
index) index ;;
rss) rss ;;
sparse) sparse ;;
share) share ;;
all) index && rss && sparse && share ;;
*) sed -n '2,20p' "$0" >&2 && exit 2 ;;
esac
