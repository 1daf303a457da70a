#!/usr/bin/env bash
# `qdedup checksum -d blake3` of a deduplicated output against `b3sum` of its raw
# source and against one plain read of that source (issue 15).
#
# usage: scripts/bench-checksum.sh [SIZE] [ROUNDS]
#
# SIZE (default 2G, env SIZE): the generated input, `gen_sample mixed` (25% zero,
# 35% repeats, 20% text, 20% random in 64 KiB blocks, written densely: every byte
# of it is on disk). It is converted once with `qdedup convert`; then each command
# runs ROUNDS times (default 5, env ROUNDS) in alternation, page cache warm:
#
#   read       cat IN >/dev/null              (reading the raw source once)
#   b3sum      b3sum --no-names IN            (BLAKE3 of the source, all cores)
#   sum-raw    qdedup checksum -d blake3 IN   (the source itself: zeros skipped)
#   sum-out    qdedup checksum -d blake3 OUT  (the deduplicated output)
#   sum-sha    qdedup checksum -d sha256 OUT
#
# and prints the median and min wall time and the median CPU time (user + system,
# from GNU time) of each, and the ratios read / sum-out and b3sum / sum-out (> 1:
# checksum of the output is faster). On a shared machine other processes only add
# wall time; the mins and the CPU times are the steadier figures. `b3sum` comes from
# `cargo install b3sum` (it is the blake3 crate's command). WORKDIR (default
# ${TMPDIR:-/tmp}/qdedup-checksum) keeps the input and output between runs.
set -euo pipefail

SIZE=${1:-${SIZE:-2G}}
ROUNDS=${2:-${ROUNDS:-5}}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/qdedup-checksum}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in b3sum cargo bc /usr/bin/time; do
    command -v "$tool" >/dev/null || {
        echo "bench-checksum: $tool is required (b3sum: cargo install b3sum)" >&2
        exit 2
    }
done

echo "== building (release)"
(cd "$ROOT" && cargo build --release --quiet --bin qdedup --example gen_sample)
BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
QDEDUP=$BIN_DIR/qdedup
GEN=$BIN_DIR/examples/gen_sample

mkdir -p "$WORKDIR"
IN=$WORKDIR/mixed-$SIZE.raw
OUT=$WORKDIR/mixed-$SIZE.qcow2
if [ ! -f "$IN" ]; then
    echo "== generating $IN"
    "$GEN" "$IN" "$SIZE" mixed
fi
if [ ! -f "$OUT" ] || [ "$OUT" -ot "$IN" ]; then
    echo "== converting to $OUT"
    "$QDEDUP" convert -q --no-sync --force "$IN" "$OUT"
fi
echo "input $(du -h --apparent-size "$IN" | cut -f1), output $(du -h "$OUT" | cut -f1)," \
    "$(nproc) cores"

# Same content, same digest.
a=$("$QDEDUP" checksum -d blake3 "$IN" | cut -d' ' -f1)
b=$("$QDEDUP" checksum -d blake3 "$OUT" | cut -d' ' -f1)
[ "$a" = "$b" ] || {
    echo "bench-checksum: digests differ: $a (input) $b (output)" >&2
    exit 1
}
echo "blake3 blkhash digest of both: $a"

names=(read b3sum sum-raw sum-out sum-sha)
run() {
    case $1 in
    read) cat "$IN" >/dev/null ;;
    b3sum) b3sum --no-names "$IN" >/dev/null ;;
    sum-raw) "$QDEDUP" checksum -d blake3 "$IN" >/dev/null ;;
    sum-out) "$QDEDUP" checksum -d blake3 "$OUT" >/dev/null ;;
    sum-sha) "$QDEDUP" checksum -d sha256 "$OUT" >/dev/null ;;
    esac
}

# Warm the page cache.
cat "$IN" "$OUT" >/dev/null
declare -A walls cpus
tfile=$(mktemp)
trap 'rm -f "$tfile"' EXIT
for ((r = 1; r <= ROUNDS; r++)); do
    for n in "${names[@]}"; do
        # GNU time: wall seconds, user + system CPU seconds.
        /usr/bin/time -f '%e %U %S' -o "$tfile" bash -c "$(declare -f run); IN='$IN' OUT='$OUT' QDEDUP='$QDEDUP' run $n"
        read -r wall user sys <"$tfile"
        walls[$n]+="$wall "
        cpus[$n]+="$(echo "$user + $sys" | bc -l) "
    done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
minimum() { tr ' ' '\n' | grep . | sort -g | head -1; }
declare -A med mins cpu
printf '%-8s %12s %10s %12s\n' command "wall median" "wall min" "CPU median"
for n in "${names[@]}"; do
    med[$n]=$(echo "${walls[$n]}" | median)
    mins[$n]=$(echo "${walls[$n]}" | minimum)
    cpu[$n]=$(echo "${cpus[$n]}" | median)
    printf '%-8s %11.2fs %9.2fs %11.2fs\n' "$n" "${med[$n]}" "${mins[$n]}" "${cpu[$n]}"
done
ratio() { echo "scale=2; $1 / $2" | bc -l; }
for base in read b3sum; do
    echo "$base / sum-out: wall $(ratio "${med[$base]}" "${med[sum-out]}") (medians)," \
        "$(ratio "${mins[$base]}" "${mins[sum-out]}") (mins); CPU $(ratio "${cpu[$base]}" "${cpu[sum-out]}")"
done
