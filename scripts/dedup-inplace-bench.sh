#!/usr/bin/env bash
# In-place dedup against a conversion to a new file (issue 17).
#
# usage: scripts/dedup-inplace-bench.sh [SIZE]
#
# Generates a raw disk of SIZE (default 2G, env SIZE) in 64 KiB clusters, of which
# DUP (default 0.35) are copies of earlier clusters and the rest random, turns it
# into qcow2 with `qemu-img convert` (no dedup: every copy stored), then times on
# copies of that image:
#
#   convert   qdedup convert IMG NEW   (the dedup a conversion to a new file gives)
#   dedup     qdedup dedup IMG         (in place: remap, free, punch holes)
#   compact   qdedup dedup --compact IMG (and move the tail into the holes)
#
# and prints wall time, bytes written (the dedup report's bytes-written; for
# convert, the size of the new file), and the file and allocated sizes after.
# Every result is checked with `qemu-img check` and `qemu-img compare`.
# Environment: WORKDIR (default ${TMPDIR:-/tmp}/qdedup-inplace), RAW (where the
# generated raw disk goes, default in WORKDIR; it is kept and reused), QDEDUP (the
# binary, default target/release/qdedup), SYNC=0 to pass --no-sync to both.
#
# Hole punching is where a file system can differ most: on ext4 mounted with
# `discard` and without a journal every fallocate(PUNCH_HOLE) that frees blocks
# waits for the device's trim (milliseconds each, so plain dedup punches as few
# runs as it can); see docs/benchmarks.md.
set -euo pipefail

SIZE=${1:-${SIZE:-2G}}
DUP=${DUP:-0.35}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/qdedup-inplace}
QDEDUP=${QDEDUP:-target/release/qdedup}
NOSYNC=()
[[ ${SYNC:-1} == 0 ]] && NOSYNC=(--no-sync)
mkdir -p "$WORKDIR"
raw=${RAW:-$WORKDIR/in-$SIZE-$DUP.raw}
base=$WORKDIR/base-$SIZE-$DUP.qcow2

if [[ ! -f $raw ]]; then
    python3 - "$raw" "$SIZE" "$DUP" <<'PY'
import random, sys
path, size, dup = sys.argv[1], sys.argv[2], float(sys.argv[3])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * units[size[-1].upper()] if size[-1].isalpha() else int(size)
cs = 65536
rng = random.Random(17)
kept = []
with open(path, "wb") as f:
    for i in range(n // cs):
        if kept and rng.random() < dup:
            f.write(kept[rng.randrange(len(kept))])
        else:
            c = rng.randbytes(cs)
            if len(kept) < 4096:
                kept.append(c)
            f.write(c)
PY
fi
[[ -f $base ]] || qemu-img convert -f raw -O qcow2 "$raw" "$base"

now() { date +%s.%N; }
alloc() { echo $(( $(stat -c %b "$1") * 512 )); }
size() { stat -c %s "$1"; }
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

img_size=$(size "$base")
printf '%-8s %10s %14s %8s %14s %14s\n' what seconds bytes-written '% image' file-size allocated
row() { printf '%-8s %10.2f %14d %7.2f%% %14d %14d\n' "$1" "$2" "$3" \
    "$(python3 -c "print(100*$3/$img_size)")" "$(size "$4")" "$(alloc "$4")"; }
row image 0 0 "$base"

# convert to a new file
cp --sparse=always "$base" "$WORKDIR/a.qcow2"
rm -f "$WORKDIR/new.qcow2"
sync
t0=$(now)
"$QDEDUP" convert -q "${NOSYNC[@]}" "$WORKDIR/a.qcow2" "$WORKDIR/new.qcow2"
t1=$(now)
row convert "$(echo "$t1 - $t0" | bc)" "$(size "$WORKDIR/new.qcow2")" "$WORKDIR/new.qcow2"
qemu-img compare -q "$base" "$WORKDIR/new.qcow2"

for mode in dedup compact; do
    extra=()
    [[ $mode == compact ]] && extra=(--compact)
    cp --sparse=always "$base" "$WORKDIR/a.qcow2"
    sync
    t0=$(now)
    "$QDEDUP" dedup --output json "${NOSYNC[@]}" "${extra[@]}" "$WORKDIR/a.qcow2" > "$WORKDIR/$mode.json"
    t1=$(now)
    row "$mode" "$(echo "$t1 - $t0" | bc)" "$(field "$WORKDIR/$mode.json" bytes-written)" "$WORKDIR/a.qcow2"
    echo "         ($(field "$WORKDIR/$mode.json" hole-punches) hole punches, $(field "$WORKDIR/$mode.json" clusters-moved-to-join-holes) clusters moved to join holes)"
    qemu-img check -q "$WORKDIR/a.qcow2"
    qemu-img compare -q "$base" "$WORKDIR/a.qcow2"
done
echo "clusters remapped: $(field "$WORKDIR/dedup.json" clusters-remapped), moved (compact): $(field "$WORKDIR/compact.json" clusters-moved)"
