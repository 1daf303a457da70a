#!/usr/bin/env bash
# In-place dedup against a conversion to a new file (issue 17).
#
# usage: scripts/dedup-inplace-bench.sh [SIZE]
#
# Generates a raw disk of SIZE (default 2G, env SIZE) in 64 KiB clusters, of which
# DUP (default 0.35) are copies of earlier clusters and the rest random, turns it
# into qcow2 with `qemu-img convert` (no dedup: every copy stored), then times on
# copies of that image, ROUNDS times in alternation (default 1):
#
#   convert   qdedup convert IMG NEW   (the dedup a conversion to a new file gives)
#   +rm       that, and then `rm IMG` (a conversion gives the space back only
#             once the original is gone; on a file system that trims at once
#             the removal is most of the cost)
#   dedup     qdedup dedup IMG         (in place: remap, free, punch holes)
#   compact   qdedup dedup --compact IMG (and move the tail into the holes)
#
# and prints wall time, bytes written (the dedup report's bytes-written; for
# convert, the size of the new file), and the file and allocated sizes after, then
# the medians and whether dedup beat the conversion and wrote under 5% of the
# image. Every result is checked with `qemu-img check` and `qemu-img compare`.
#
# Environment: WORKDIR (default ${TMPDIR:-/tmp}/qdedup-inplace), RAW (where the
# generated raw disk goes, default in WORKDIR; it is kept and reused), QDEDUP (the
# binary, default target/release/qdedup), SYNC=0 to pass --no-sync to both,
# ROUNDS (default 1).
#
# Where the images live: WORKDIR's file system, or with FS=ext4 a fresh ext4 made
# by `mkfs.ext4` with its defaults (a journal) in a file in WORKDIR, attached to a
# loop device (direct I/O, so the page cache is not doubled) and mounted with
# MOUNT_OPTS (default: none; e.g. MOUNT_OPTS=discard), unmounted and deleted at the
# end. FS=ext4 needs root (losetup, mount). The file system type and mount options
# are printed first.
#
# Hole punching is where a file system can differ most: on ext4 mounted with
# `discard` and without a journal every fallocate(PUNCH_HOLE) that frees blocks
# waits for the device's trim (milliseconds each, so plain dedup punches as few
# runs as it can); with a journal (the mkfs.ext4 default) the trims are issued
# after the journal commit, in the background. See docs/benchmarks.md.
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

# Where the copies are made and timed.
DIR=$WORKDIR
case ${FS:-} in
'') ;;
ext4)
    [[ $(id -u) == 0 ]] || { echo "FS=ext4 needs root (losetup, mount)" >&2; exit 2; }
    fsimg=$WORKDIR/fs-ext4.img
    DIR=$WORKDIR/mnt
    loopdev=
    cleanup() {
        mountpoint -q "$DIR" && umount "$DIR"
        [[ -n $loopdev ]] && losetup -d "$loopdev"
        rm -f "$fsimg"
    }
    trap cleanup EXIT
    rm -f "$fsimg"
    truncate -s $(( 3 * $(size "$raw") + (1 << 30) )) "$fsimg"
    mkfs.ext4 -q -F "$fsimg"
    loopdev=$(losetup --direct-io=on -f --show "$fsimg")
    mkdir -p "$DIR"
    mount ${MOUNT_OPTS:+-o "$MOUNT_OPTS"} "$loopdev" "$DIR"
    ;;
*)
    echo "FS must be empty or ext4" >&2
    exit 2
    ;;
esac
journal=
if [[ $(findmnt -no FSTYPE -T "$DIR") == ext4 ]]; then
    # An ext4 with a journal has a jbd2 entry named after its device.
    dev=$(basename "$(realpath "$(findmnt -no SOURCE -T "$DIR")")")
    journal="; journal: no"
    compgen -G "/proc/fs/jbd2/$dev-*" >/dev/null && journal="; journal: yes"
fi
echo "on: $DIR ($(findmnt -no FSTYPE,OPTIONS -T "$DIR" | head -1)$journal)"

img_size=$(size "$base")
printf '%-8s %10s %14s %8s %14s %14s\n' what seconds bytes-written '% image' file-size allocated
row() { printf '%-8s %10.2f %14d %7.2f%% %14d %14d\n' "$1" "$2" "$3" \
    "$(python3 -c "print(100*$3/$img_size)")" "$(size "$4")" "$(alloc "$4")"; }
row image 0 0 "$base"

declare -A TIMES WRITTEN
for round in $(seq 1 "${ROUNDS:-1}"); do
    # convert to a new file
    cp --sparse=always "$base" "$DIR/a.qcow2"
    rm -f "$DIR/new.qcow2"
    sync
    t0=$(now)
    "$QDEDUP" convert -q "${NOSYNC[@]}" "$DIR/a.qcow2" "$DIR/new.qcow2"
    t1=$(now)
    secs=$(echo "$t1 - $t0" | bc)
    row convert "$secs" "$(size "$DIR/new.qcow2")" "$DIR/new.qcow2"
    TIMES[convert]+="$secs "
    WRITTEN[convert]=$(size "$DIR/new.qcow2")
    qemu-img compare -q "$base" "$DIR/new.qcow2"
    # The conversion gives no space back until the original goes: time that too.
    t0=$(now)
    rm "$DIR/a.qcow2"
    sync -f "$DIR"
    t1=$(now)
    secs=$(echo "$secs + $t1 - $t0" | bc)
    printf '%-8s %10.2f   (convert, then remove the original: the space back)\n' "+rm" "$secs"
    TIMES[replace]+="$secs "
    rm -f "$DIR/new.qcow2"

    for mode in dedup compact; do
        extra=()
        [[ $mode == compact ]] && extra=(--compact)
        cp --sparse=always "$base" "$DIR/a.qcow2"
        sync
        t0=$(now)
        "$QDEDUP" dedup --output json "${NOSYNC[@]}" "${extra[@]}" "$DIR/a.qcow2" > "$WORKDIR/$mode.json"
        t1=$(now)
        secs=$(echo "$t1 - $t0" | bc)
        row "$mode" "$secs" "$(field "$WORKDIR/$mode.json" bytes-written)" "$DIR/a.qcow2"
        echo "         ($(field "$WORKDIR/$mode.json" hole-punches) hole punches, $(field "$WORKDIR/$mode.json" clusters-moved-to-join-holes) clusters moved to join holes)"
        TIMES[$mode]+="$secs "
        WRITTEN[$mode]=$(field "$WORKDIR/$mode.json" bytes-written)
        qemu-img check -q "$DIR/a.qcow2"
        qemu-img compare -q "$base" "$DIR/a.qcow2"
    done
done
rm -f "$DIR/a.qcow2"
echo "clusters remapped: $(field "$WORKDIR/dedup.json" clusters-remapped), moved (compact): $(field "$WORKDIR/compact.json" clusters-moved)"
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mc=$(median "${TIMES[convert]}")
md=$(median "${TIMES[dedup]}")
mk=$(median "${TIMES[compact]}")
mr=$(median "${TIMES[replace]}")
echo "medians of ${ROUNDS:-1}: convert ${mc}s, convert and remove the original ${mr}s, dedup ${md}s, dedup --compact ${mk}s"
awk -v c="$mc" -v d="$md" -v w="${WRITTEN[dedup]}" -v s="$img_size" 'BEGIN {
    printf "dedup against convert: %.2fx as fast (%s), writes %.2f%% of the image (%s)\n",
        c / d, (d < c) ? "faster" : "NOT faster", 100 * w / s, (w < 0.05 * s) ? "under 5%" : "NOT under 5%"
}'
