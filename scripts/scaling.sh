#!/usr/bin/env bash
# How `qdedup convert` scales with workers on a many-core machine (issue 16: the
# writer thread's share caps the pipeline). Needs no cargo, perf or qemu-img: it
# takes prebuilt binaries, so it runs on a bare machine.
#
# usage: scripts/scaling.sh GEN SIZE "WORKERS..." NAME=QDEDUP [NAME=QDEDUP ...]
#
#   GEN      the gen_sample example binary (inputs: SIZE mixed and random)
#   WORKERS  worker counts to run, e.g. "1 2 4 8 15"
#   NAME=QDEDUP  binaries to compare (e.g. before=/path/qdedup after=/path/qdedup;
#            "NAME=QDEDUP --flag" adds convert options); runs alternate between
#            them, ROUNDS (default 3) times each
#
# Every conversion is unsynced (--no-sync) into WORKDIR (default
# ${TMPDIR:-/tmp}/qdedup-scaling), after reading the input once (page cache warm) and
# removing the previous output. Prints one line per run: binary, input, workers,
# wall / user / system seconds, and the per-thread CPU figures a binary prints
# with QDEDUP_THREAD_CPU=1 (older binaries print none). Outputs of the first round
# must be byte-identical across worker counts (cmp).
set -euo pipefail
GEN=$1 SIZE=$2 WORKERS=$3
shift 3
ROUNDS=${ROUNDS:-3}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/qdedup-scaling}
mkdir -p "$WORKDIR"
nproc
for kind in mixed random; do
    [[ -f $WORKDIR/$kind.raw ]] || "$GEN" "$WORKDIR/$kind.raw" "$SIZE" "$kind" 1
done
TIMEFORMAT='%R %U %S'
for kind in mixed random; do
    in=$WORKDIR/$kind.raw
    for round in $(seq 1 "$ROUNDS"); do
        for m in $WORKERS; do
            for spec in "$@"; do
                name=${spec%%=*}
                read -r bin args <<<"${spec#*=}"
                # shellcheck disable=SC2086 # options split on purpose
                rm -f "$WORKDIR/out.qcow2"
                cat "$in" >/dev/null
                t=$({ time QDEDUP_THREAD_CPU=1 "$bin" convert --no-sync -q -m "$m" $args "$in" "$WORKDIR/out.qcow2" 2>"$WORKDIR/threads.txt"; } 2>&1)
                echo "$name $kind -m $m round $round: wall/user/sys $t | $(tr '\n' ' ' <"$WORKDIR/threads.txt")"
                if [[ $round == 1 ]]; then
                    if [[ -f $WORKDIR/ref-$kind.qcow2 ]]; then
                        cmp -s "$WORKDIR/out.qcow2" "$WORKDIR/ref-$kind.qcow2" || echo "   OUTPUT DIFFERS from the first run's"
                    else
                        cp "$WORKDIR/out.qcow2" "$WORKDIR/ref-$kind.qcow2"
                    fi
                fi
            done
        done
    done
done
rm -f "$WORKDIR"/out.qcow2 "$WORKDIR"/ref-*.qcow2
