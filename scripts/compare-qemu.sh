#!/usr/bin/env bash
# Side-by-side timings of `qdedup convert` and `qemu-img convert` (issue 4, 5 and 19).
#
# usage: scripts/compare-qemu.sh [plain|compress|sparse|scattered|issue19|all] [SIZE] [ROUNDS]
#
#   issue19   the rows of issue 19's table, from one run, each as the median of
#             ROUNDS paired runs: the random input unsynced (`--no-sync` against
#             `qemu-img convert -m 8 -W`) and synced (against `-t writeback -m 8
#             -W`), the mixed input unsynced (against `-m 8 -W`), and an ext4
#             image of real files (below, FS_SIZE) with `-c` (zlib) synced against
#             `qemu-img convert -c -m 8 -W -t writeback`. Ends with one table: per
#             row the input, the pairing, both tools' median/min, the ratio of
#             the medians (and of the mins), the target and whether the median
#             meets it, and the `qemu-img check` / `compare` verdicts of both
#             outputs. Not part of `all`
#   plain     mixed, all-random and filesystem (4 KiB clusters) images: qdedup
#             against qemu-img, default and `-m 8 -W`, synced and unsynced
#   compress  the mixed image with -c (zlib) and zstd against `qemu-img convert -c`
#   sparse    a 1 TiB sparse raw holding SPARSE_DATA of data against a dense file
#             of that data (qdedup only)
#   scattered peak RSS and time of qdedup and qemu-img on a SCATTER_SIZE sparse raw
#             with 4 KiB of data every 512 MiB (one L2 table per piece at 64 KiB
#             clusters; issue 18: memory that grows with the L2 tables touched).
#             Not part of `all`: its output holds 2 GiB of L2 tables
#   all       plain, compress and sparse (the default)
#
# SIZE (default 2G, env SIZE) is the size of each generated input; ROUNDS (default
# 5, env ROUNDS; compress mode uses CROUNDS, default 3) is the number of timed runs
# of each command, in alternation. Other environment variables:
#   WORKDIR      where inputs and outputs go (default ${TMPDIR:-/tmp}/qdedup-compare);
#                inputs are kept and reused while their size matches
#   SPARSE_DATA  data in the sparse image (default 1G)
#   SCATTER_SIZE size of the scattered image (default 16383G: ext4 refuses files of
#                16 TiB; the issue's 16T, 32768 pieces, works on XFS or tmpfs)
#   KEEP=1       keep the outputs of the last round
#   AA=1         an A/A control: the first qdedup command of each set runs twice
#                per round under two labels and is paired with itself; its ratio
#                shows what the protocol alone makes of one command (about 1.00x)
#   FS_SIZE      size of issue19's ext4 image of real files (default 2G). The image
#                is made with `mkfs.ext4 -d` from a tree of this machine's files:
#                every k-th file (name order) of each of FS_ROOTS (default
#                "/usr/include /usr/bin /usr/share /usr/lib"), an equal share of
#                FS_FILL percent (default 75) of the image divided by FS_COPIES
#                (default 3), the unused part of a share passed on to the next root;
#                that tree FS_COPIES times side by side (sharing, at file
#                granularity: the copies do not start on cluster boundaries); one
#                time stamp, a fixed UUID, hash seed and mkfs clock (as
#                tests/common's real_files_fs), so the image is the same on every
#                run on one machine. Kept as realfs-SIZE-fFILL-cCOPIES.ext4 and
#                reused (delete it after changing FS_ROOTS)
#
# Like is compared with like: `qemu-img convert` does not flush by default
# (cache=unsafe), so an unsynced qdedup run (`--no-sync`) is compared with the
# default, and a synced one with `qemu-img convert -t writeback` (flushes at close).
# The commands of a set run in a new shuffled order every round (seeded with the
# round number, so the same orders on every run). Before every timed run the input
# is read once (the page cache is warm for both tools), `sync` runs and the memory
# freed is let go back to the host (see settle below); after it, `sync` runs and
# its output is removed (the last round's once checked), so no run starts with
# another's output in the page cache. The wall time printed is
# the median over the rounds (min in brackets); ratios are qemu-img time / qdedup
# time (> 1: qdedup is faster), of the medians and of the mins, and qdedup size /
# qemu-img size. On a shared VM the noise only ever adds time, so the ratio of the
# mins (the least disturbed runs) is the steadier figure; see docs/benchmarks.md.
set -euo pipefail

MODE=${1:-all}
SIZE=${2:-${SIZE:-2G}}
ROUNDS=${3:-${ROUNDS:-5}}
CROUNDS=${CROUNDS:-3}
SPARSE_DATA=${SPARSE_DATA:-1G}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/qdedup-compare}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

case $MODE in plain | compress | sparse | scattered | issue19 | all) ;; *)
    sed -n '2,58p' "$0" >&2
    exit 2
    ;;
esac
for tool in qemu-img mke2fs cargo; do
    command -v "$tool" >/dev/null || {
        echo "compare-qemu: $tool is required" >&2
        exit 2
    }
done

echo "== building (release)"
(cd "$ROOT" && cargo build --release --quiet --bin qdedup --example gen_sample)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
QDEDUP=$TARGET_DIR/release/qdedup
GEN=$TARGET_DIR/release/examples/gen_sample
mkdir -p "$WORKDIR/out"
OUT=$WORKDIR/out

bytes() { # SIZE with suffix -> bytes
    local s=$1 n=${1%[kKmMgGtT]} m=1
    case $s in *[kK]) m=1024 ;; *[mM]) m=$((1 << 20)) ;; *[gG]) m=$((1 << 30)) ;; *[tT]) m=$((1 << 40)) ;; esac
    echo $((n * m))
}
SIZE_B=$(bytes "$SIZE")

# gen FILE SIZE KIND [SEED]: generate unless present with the right size.
gen() {
    if [[ ! -f $1 || $(stat -c %s "$1") != "$(bytes "$2")" ]]; then
        echo "   generating $(basename "$1") ($2, $3)"
        "$GEN" "$1" "$2" "$3" "${4:-1}"
    fi
}

# A file system image with repeated files: a base set of files (mixed content)
# copied into four directories (50% of the image), plus unique random files (10%).
make_fs() {
    local img=$WORKDIR/fs-$SIZE.img
    if [[ -f $img && $(stat -c %s "$img") == "$SIZE_B" ]]; then
        FS=$img
        return
    fi
    echo "   generating fs-$SIZE.img (mke2fs -d)"
    local tree=$WORKDIR/tree
    rm -rf "$tree"
    mkdir -p "$tree/base"
    local unit=$((SIZE_B / 100)) i
    for i in $(seq 1 16); do
        # Files of 1/400 .. 1/100 of the image (10% in all), mixed content.
        "$GEN" "$tree/base/file$i.bin" $((unit * (1 + i % 4) / 4 / 4096 * 4096)) mixed $((100 + i))
    done
    for i in 1 2 3 4; do
        mkdir -p "$tree/copy$i"
        cp -r "$tree/base/." "$tree/copy$i/"
        "$GEN" "$tree/copy$i/unique.bin" $((SIZE_B / 40 / 4096 * 4096)) random $((200 + i))
    done
    rm -f "$img" "$img.tmp"
    mke2fs -q -t ext4 -b 4096 -d "$tree" "$img.tmp" "$((SIZE_B / 1024))k"
    mv "$img.tmp" "$img"
    rm -rf "$tree"
    FS=$img
}

# make_realfs: issue19's ext4 image of real files (see FS_SIZE above); sets REALFS.
make_realfs() {
    local size=${FS_SIZE:-2G} fill=${FS_FILL:-75} copies=${FS_COPIES:-3}
    local img size_b roots=() r left i c dest share
    img=$WORKDIR/realfs-$size-f$fill-c$copies.ext4
    size_b=$(bytes "$size")
    REALFS=$img
    [[ -f $img && $(stat -c %s "$img") == "$size_b" ]] && return
    echo "   generating $(basename "$img") (real files, mkfs.ext4 -d)"
    for r in ${FS_ROOTS:-/usr/include /usr/bin /usr/share /usr/lib}; do
        [[ -d $r ]] && roots+=("$r")
    done
    ((${#roots[@]} > 0)) || {
        echo "compare-qemu: none of FS_ROOTS is a directory" >&2
        exit 2
    }
    local tree=$WORKDIR/realtree
    rm -rf "$tree"
    mkdir -p "$tree/c0"
    left=$((size_b * fill / 100 / copies))
    for i in "${!roots[@]}"; do
        dest=$tree/c0/r$i
        mkdir -p "$dest"
        share=$((left / (${#roots[@]} - i)))
        # Every k-th file of the root in name order (k: the root's bytes over its
        # share), counted in whole 4 KiB blocks, while it fits in the share.
        (cd "${roots[$i]}" && find . -xdev -type f -readable -printf '%s\t%P\n' 2>/dev/null |
            LC_ALL=C sort -t $'\t' -k2 |
            awk -F'\t' -v share="$share" '
                { s[NR] = int(($1 + 4095) / 4096) * 4096; p[NR] = $2; t += s[NR] }
                END {
                    k = t / share; if (k < 1) k = 1; left = share
                    for (x = 1; x <= NR; x += k) {
                        j = int(x)
                        if (s[j] <= left) { left -= s[j]; print p[j] }
                    }
                }' |
            xargs -d '\n' -r cp --parents -t "$dest" 2>/dev/null) || true
        # What the copied files take in whole blocks, as the share counted them.
        left=$((left - $(du -sk "$dest" | cut -f1) * 1024))
        ((left > 0)) || left=0
    done
    for c in $(seq 1 $((copies - 1))); do
        cp -a "$tree/c0" "$tree/c$c"
    done
    # One time stamp, UUID, hash seed and mkfs clock: the same image on every run.
    find "$tree" -exec touch -h -d @1700000000 {} +
    rm -f "$img" "$img.tmp"
    E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -F -t ext4 -U 6b0c7a52-8c1e-4d1e-9a53-2f4a6a1e0d11 \
        -E hash_seed=3f1d0c9e-5b7a-4e2c-8d6f-1a2b3c4d5e6f -d "$tree" "$img.tmp" "$((size_b / 1024))k" >/dev/null
    mv "$img.tmp" "$img"
    rm -rf "$tree"
}

# warm FILE: read it once so that the page cache is warm. The sparse image is read
# only where it has data (SPARSE_PIECES: "skip" offsets in 64 MiB units).
SPARSE_PIECES=""
warm() {
    if [[ -n $SPARSE_PIECES && $1 == *sparse-1T-* ]]; then
        local p
        for p in $SPARSE_PIECES; do
            dd if="$1" of=/dev/null bs=64M skip="$p" count=1 status=none
        done
    else
        cat "$1" >/dev/null
    fi
}

# settle: wait until the memory freed by removing the last output has gone back to
# the host. On a VM with free page reporting (virtio-balloon; this one reports
# freed memory at once: /sys/module/page_reporting), memory freed just before a
# run is still backed and cheap to write into, memory freed a few seconds earlier
# is not: whether a run found one or the other changed identical runs by up to
# 10x. Waiting puts every run of every tool in the same state (all free memory
# returned), where each page a tool writes costs the same. SETTLE=0 skips this;
# SETTLE=N waits N seconds where the reporting counter is not readable.
REPORTED=/sys/module/page_reporting/parameters/reported_kib
settle() {
    [[ ${SETTLE:-3} == 0 ]] && return
    if [[ -r $REPORTED ]]; then
        local last now stable=0 i
        last=$(cat "$REPORTED")
        for i in $(seq 1 30); do
            sleep 0.5
            now=$(cat "$REPORTED")
            if [[ $now == "$last" ]]; then
                stable=$((stable + 1))
                ((stable >= 4)) && return
            else
                stable=0
            fi
            last=$now
        done
    else
        sleep "${SETTLE:-3}"
    fi
}

# timed LABEL INPUT OUTPUT CMD...: one timed run; appends "LABEL seconds" to $TIMES.
timed() {
    local label=$1 input=$2 output=$3
    shift 3
    rm -f "$output"
    warm "$input"
    sync
    settle
    local s e
    s=$(date +%s.%N)
    "$@" >/dev/null 2>"$WORKDIR/stderr" || {
        echo "FAILED: $*" >&2
        cat "$WORKDIR/stderr" >&2
        exit 1
    }
    e=$(date +%s.%N)
    sync
    echo "$label $(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.4f", e - s }')" >>"$TIMES"
}

median() { # LABEL -> "median min"
    awk -v l="$1" '$1 == l { print $2 }' "$TIMES" | sort -g |
        awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.3f %.3f\n", m, a[1] }'
}

verdicts() { # INPUT OUTPUT -> "check compare"
    local c k
    if qemu-img check -q "$2" >/dev/null 2>&1; then c=clean; else c="FAIL($?)"; fi
    if qemu-img compare -q -f raw -F qcow2 "$1" "$2" >/dev/null 2>&1; then k=identical; else k="DIFFER($?)"; fi
    echo "$c $k"
}

# run_set NAME INPUT ROUNDS PAIRS...: each pair is "qlabel|qemu-label"; commands are in
# the CMD associative array, keyed by label, with @IN and @OUT placeholders. The
# results stay in RES_MED, RES_MIN and RES_VERDICT, keyed by "NAME/label".
declare -A CMD RES_MED RES_MIN RES_VERDICT
run_set() {
    local name=$1 input=$2 rounds=$3
    shift 3
    local pairs=("$@") labels=() p l r i n
    for p in "${pairs[@]}"; do
        labels+=("${p%%|*}" "${p##*|}")
    done
    # Unique labels, in order.
    local uniq=() seen=" "
    for l in "${labels[@]}"; do
        [[ $seen == *" $l "* ]] || {
            uniq+=("$l")
            seen+="$l "
        }
    done
    # AA=1: the first qdedup command once more under another label, paired with
    # itself: the protocol's own bias, which should come out at 1.00x.
    if [[ ${AA:-0} == 1 ]]; then
        l=${pairs[0]%%|*}
        CMD[$l-again]=${CMD[$l]}
        uniq+=("$l-again")
        pairs+=("$l|$l-again")
    fi
    TIMES=$WORKDIR/times-$name
    : >"$TIMES"
    n=${#uniq[@]}
    declare -A MED MIN SZ VERDICT
    for r in $(seq 1 "$rounds"); do
        printf '   round %d/%d\r' "$r" "$rounds"
        # A new order every round, shuffled with the round number as the seed (the
        # same orders on every run of the script): a rotation would keep each
        # command's predecessor, and on a VM the predecessor decides which memory
        # the next run writes into (see docs/benchmarks.md, "Order bias").
        for l in $(for l in "${uniq[@]}"; do echo "$l"; done |
            awk -v seed="$r" 'BEGIN { srand(seed) } { printf "%.9f\t%s\n", rand(), $0 }' |
            sort -k1,1g | cut -f2); do
            local cmd=${CMD[$l]//@IN/$input}
            cmd=${cmd//@OUT/$OUT/$l.qcow2}
            # shellcheck disable=SC2086 # the command is a word list
            timed "$l" "$input" "$OUT/$l.qcow2" $cmd
            # Every output goes right after its run (the last round's once its
            # size and verdicts are taken), so that no run starts with other
            # commands' outputs in the page cache.
            if ((r == rounds)); then
                SZ[$l]=$(stat -c %s "$OUT/$l.qcow2")
                VERDICT[$l]=$(verdicts "$input" "$OUT/$l.qcow2")
                [[ ${KEEP:-0} == 1 ]] || rm -f "$OUT/$l.qcow2"
            else
                rm -f "$OUT/$l.qcow2"
            fi
        done
    done
    printf '\n'
    printf '%-22s %8s %8s %12s %7s %-8s %-10s\n' "$name: command" "median" "(min)" "size" "" "check" "compare"
    for l in "${uniq[@]}"; do
        read -r med min < <(median "$l")
        MED[$l]=$med
        MIN[$l]=$min
        read -r c k <<<"${VERDICT[$l]}"
        printf '%-22s %7ss %7ss %12s %7s %-8s %-10s\n' "$l" "$med" "$min" "${SZ[$l]}" "" "$c" "$k"
        RES_MED[$name/$l]=$med
        RES_MIN[$name/$l]=$min
        RES_VERDICT[$name/$l]="$c/$k"
    done
    for p in "${pairs[@]}"; do
        local a=${p%%|*} b=${p##*|}
        awk -v a="$a" -v b="$b" -v ta="${MED[$a]}" -v tb="${MED[$b]}" -v sa="${SZ[$a]}" -v sb="${SZ[$b]}" \
            -v ma="${MIN[$a]}" -v mb="${MIN[$b]}" \
            'BEGIN { printf "  %-22s vs %-22s speed %.2fx (mins %.2fx)  size %.3fx\n", a, b, tb / ta, mb / ma, sa / sb }'
    done
}

machine() {
    echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r)"
    echo "   $(qemu-img --version | head -1); load: $(cut -d' ' -f1-3 /proc/loadavg)"
}

plain() {
    echo "== inputs ($SIZE)"
    gen "$WORKDIR/mixed-$SIZE.raw" "$SIZE" mixed
    gen "$WORKDIR/random-$SIZE.raw" "$SIZE" random
    make_fs
    local o
    for input in "$WORKDIR/mixed-$SIZE.raw" "$WORKDIR/random-$SIZE.raw" "$FS"; do
        o=""
        [[ $input == "$FS" ]] && o="-o cluster_size=4096"
        CMD=(
            [qdedup-nosync]="$QDEDUP convert -q --no-sync $o @IN @OUT"
            [qemu-img]="qemu-img convert -O qcow2 $o @IN @OUT"
            [qemu-img-m8W]="qemu-img convert -O qcow2 -m 8 -W $o @IN @OUT"
            [qdedup-sync]="$QDEDUP convert -q $o @IN @OUT"
            [qemu-img-wb]="qemu-img convert -t writeback -O qcow2 $o @IN @OUT"
            [qemu-img-wb-m8W]="qemu-img convert -t writeback -O qcow2 -m 8 -W $o @IN @OUT"
        )
        echo "== $(basename "$input") ${o:+($o)}"
        run_set "$(basename "$input")" "$input" "$ROUNDS" \
            "qdedup-nosync|qemu-img" "qdedup-nosync|qemu-img-m8W" \
            "qdedup-sync|qemu-img-wb" "qdedup-sync|qemu-img-wb-m8W"
    done
    echo "== peak RSS, all-random (unique) input"
    /usr/bin/time -f "   qdedup: %M KiB max RSS, %e s" "$QDEDUP" convert -q --no-sync --force \
        "$WORKDIR/random-$SIZE.raw" "$OUT/rss.qcow2" 2>&1 >/dev/null | tail -1 ||
        echo "   (no /usr/bin/time)"
    rm -f "$OUT/rss.qcow2"
}

compress() {
    echo "== inputs ($SIZE)"
    gen "$WORKDIR/mixed-$SIZE.raw" "$SIZE" mixed
    CMD=(
        [qdedup-zlib]="$QDEDUP convert -q --no-sync -c @IN @OUT"
        [qdedup-zstd]="$QDEDUP convert -q --no-sync -c -o compression_type=zstd @IN @OUT"
        [qemu-img-zlib]="qemu-img convert -c -O qcow2 @IN @OUT"
        [qemu-img-zlib-m8W]="qemu-img convert -c -O qcow2 -m 8 -W @IN @OUT"
        [qemu-img-zstd]="qemu-img convert -c -O qcow2 -o compression_type=zstd @IN @OUT"
        [qemu-img-zstd-m8W]="qemu-img convert -c -O qcow2 -o compression_type=zstd -m 8 -W @IN @OUT"
    )
    echo "== mixed-$SIZE.raw compressed (unsynced, like qemu-img's default)"
    run_set "compressed" "$WORKDIR/mixed-$SIZE.raw" "$CROUNDS" \
        "qdedup-zlib|qemu-img-zlib" "qdedup-zlib|qemu-img-zlib-m8W" \
        "qdedup-zstd|qemu-img-zstd" "qdedup-zstd|qemu-img-zstd-m8W"
}

sparse() {
    local dense=$WORKDIR/dense-$SPARSE_DATA.raw sp=$WORKDIR/sparse-1T-$SPARSE_DATA.raw
    local data_b chunk=$((64 << 20)) i n p
    data_b=$(bytes "$SPARSE_DATA")
    gen "$dense" "$SPARSE_DATA" random 3
    n=$((data_b / chunk))
    SPARSE_PIECES=""
    for i in $(seq 0 $((n - 1))); do
        SPARSE_PIECES+=" $((i * ((1 << 40) / chunk) / n))"
    done
    if [[ ! -f $sp ]]; then
        echo "   generating sparse-1T-$SPARSE_DATA.raw"
        truncate -s 1T "$sp"
        # The data in 64 MiB pieces spread over the whole terabyte.
        i=0
        for p in $SPARSE_PIECES; do
            dd if="$dense" of="$sp" bs=64M skip="$i" seek="$p" count=1 conv=notrunc status=none
            i=$((i + 1))
        done
    fi
    echo "== dense $SPARSE_DATA vs 1 TiB sparse holding the same data (qdedup --no-sync)"
    TIMES=$WORKDIR/times-sparse
    : >"$TIMES"
    for r in $(seq 1 "$ROUNDS"); do
        printf '   round %d/%d\r' "$r" "$ROUNDS"
        # Alternate which goes first: a run is slower right after another one
        # freed a large file (see docs/benchmarks.md).
        if ((r % 2)); then
            timed dense "$dense" "$OUT/dense.qcow2" "$QDEDUP" convert -q --no-sync "$dense" "$OUT/dense.qcow2"
        fi
        # Warming the sparse file reads its data (the holes cost nothing).
        timed sparse "$sp" "$OUT/sparse.qcow2" "$QDEDUP" convert -q --no-sync "$sp" "$OUT/sparse.qcow2"
        if ((r % 2 == 0)); then
            timed dense "$dense" "$OUT/dense.qcow2" "$QDEDUP" convert -q --no-sync "$dense" "$OUT/dense.qcow2"
        fi
    done
    printf '\n'
    read -r md mind < <(median dense)
    read -r ms mins < <(median sparse)
    echo "   dense:  ${md}s (min ${mind}s)"
    echo "   sparse: ${ms}s (min ${mins}s)   sparse/dense time ratio: $(awk -v a="$ms" -v b="$md" 'BEGIN { printf "%.2f", a / b }') (mins $(awk -v a="$mins" -v b="$mind" 'BEGIN { printf "%.2f", a / b }'))"
    read -r c k < <(verdicts "$sp" "$OUT/sparse.qcow2")
    echo "   sparse output: check $c (compare skipped: 1 TiB)"
    rm -f "$OUT"/*.qcow2
}

# scattered: one run of each tool under /usr/bin/time -v (peak RSS is the figure;
# the L2 tables qdedup keeps until the end make it grow with the tables touched,
# and --max-in-flight does not bound them; issue 16 removes the cause).
scattered() {
    local size=${SCATTER_SIZE:-16383G} img
    img=$WORKDIR/scattered-$size.raw
    command -v /usr/bin/time >/dev/null || {
        echo "compare-qemu: scattered needs /usr/bin/time (GNU time)" >&2
        exit 2
    }
    gen "$img" "$size" scattered 5
    echo "== scattered-$size.raw: 4 KiB every 512 MiB, $(($(bytes "$size") / (512 << 20))) pieces (unsynced)"
    local label cmd rss secs
    printf '%-22s %10s %8s %12s %-8s\n' "command" "max RSS" "time" "size" "check"
    for label in qdedup qdedup-m8 qemu-img; do
        case $label in
        qdedup) cmd="$QDEDUP convert -q --no-sync $img $OUT/$label.qcow2" ;;
        qdedup-m8) cmd="$QDEDUP convert -q --no-sync -m 8 --max-in-flight 16M $img $OUT/$label.qcow2" ;;
        qemu-img) cmd="qemu-img convert -O qcow2 $img $OUT/$label.qcow2" ;;
        esac
        rm -f "$OUT/$label.qcow2"
        sync
        settle
        # shellcheck disable=SC2086 # the command is a word list
        /usr/bin/time -v $cmd >/dev/null 2>"$WORKDIR/time-$label" || {
            echo "FAILED: $cmd" >&2
            cat "$WORKDIR/time-$label" >&2
            exit 1
        }
        rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORKDIR/time-$label")
        secs=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$WORKDIR/time-$label")
        local c=clean
        qemu-img check -q "$OUT/$label.qcow2" >/dev/null 2>&1 || c="FAIL($?)"
        printf '%-22s %6s MiB %8s %12s %-8s\n' "$label" "$((rss / 1024))" "$secs" \
            "$(stat -c %s "$OUT/$label.qcow2")" "$c"
        rm -f "$OUT/$label.qcow2"
    done
}

# issue19: the rows of issue 19's table from one run (see the top of this file).
issue19() {
    echo "== inputs ($SIZE; real-file ext4 image ${FS_SIZE:-2G})"
    gen "$WORKDIR/random-$SIZE.raw" "$SIZE" random
    gen "$WORKDIR/mixed-$SIZE.raw" "$SIZE" mixed
    make_realfs
    local random=$WORKDIR/random-$SIZE.raw mixed=$WORKDIR/mixed-$SIZE.raw
    CMD=(
        [qdedup-nosync]="$QDEDUP convert -q --no-sync @IN @OUT"
        [qemu-img-m8W]="qemu-img convert -O qcow2 -m 8 -W @IN @OUT"
        [qdedup-sync]="$QDEDUP convert -q @IN @OUT"
        [qemu-img-wb-m8W]="qemu-img convert -t writeback -O qcow2 -m 8 -W @IN @OUT"
        [qdedup-sync-zlib]="$QDEDUP convert -q -c @IN @OUT"
        [qemu-img-wb-m8W-zlib]="qemu-img convert -c -t writeback -O qcow2 -m 8 -W @IN @OUT"
    )
    echo "== $(basename "$random")"
    run_set random "$random" "$ROUNDS" "qdedup-nosync|qemu-img-m8W" "qdedup-sync|qemu-img-wb-m8W"
    echo "== $(basename "$mixed")"
    run_set mixed "$mixed" "$ROUNDS" "qdedup-nosync|qemu-img-m8W"
    echo "== $(basename "$REALFS") compressed (zlib)"
    run_set realfs "$REALFS" "$ROUNDS" "qdedup-sync-zlib|qemu-img-wb-m8W-zlib"

    # One row per line of the issue's table: set, qdedup label, qemu-img label,
    # input, pairing, target speed.
    local rows=(
        "random|qdedup-nosync|qemu-img-m8W|random $SIZE|unsynced: --no-sync vs -m 8 -W|1.0"
        "random|qdedup-sync|qemu-img-wb-m8W|random $SIZE|synced: default vs -t writeback -m 8 -W|1.2"
        "mixed|qdedup-nosync|qemu-img-m8W|mixed $SIZE|unsynced: --no-sync vs -m 8 -W|1.3"
        "realfs|qdedup-sync-zlib|qemu-img-wb-m8W-zlib|ext4 real files ${FS_SIZE:-2G}, -c zlib|synced: -c vs -c -t writeback -m 8 -W|3.0"
    )
    echo "== issue 19: median (min) of $ROUNDS paired runs; speed = qemu-img time / qdedup time"
    printf '%-30s | %-40s | %-17s | %-17s | %-15s | %-6s | %-7s | %s\n' input "like for like" \
        "qdedup med (min)" "qemu-img med (min)" "speed (mins)" target verdict "check/compare qdedup, qemu-img"
    local row set a b input pairing target qm qn em en
    for row in "${rows[@]}"; do
        IFS='|' read -r set a b input pairing target <<<"$row"
        qm=${RES_MED[$set/$a]} qn=${RES_MIN[$set/$a]}
        em=${RES_MED[$set/$b]} en=${RES_MIN[$set/$b]}
        awk -v input="$input" -v pairing="$pairing" -v qm="$qm" -v qn="$qn" -v em="$em" -v en="$en" \
            -v target="$target" -v va="${RES_VERDICT[$set/$a]}" -v vb="${RES_VERDICT[$set/$b]}" 'BEGIN {
                r = em / qm
                printf "%-30s | %-40s | %7.3fs (%6.3fs) | %7.3fs (%6.3fs) | %5.2fx (%5.2fx) | >= %.1fx | %-7s | %s, %s\n",
                    input, pairing, qm, qn, em, en, r, en / qn, target, (r >= target) ? "met" : "NOT met", va, vb
            }'
    done
}

machine
case $MODE in
plain) plain ;;
compress) compress ;;
sparse) sparse ;;
scattered) scattered ;;
issue19) issue19 ;;
all)
    plain
    compress
    sparse
    ;;
esac
