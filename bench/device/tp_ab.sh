#!/usr/bin/env bash
# Issue 6 on nvidia-h200-x2: the regional TP runs of tp.sh under several inductor settings, one
# after the other, each in its own folder under $OUT (packed into runs.tar; summaries on top).
# Usage: TP_AB="det:TORCHINDUCTOR_DETERMINISTIC=1 default:" TP_MODELS=preset:llama-2-13b \
#        TP_ALLREDUCE=symm-one-shot TEST_S=280 TP_AB_BUDGET=570 bash bench/device/tp_ab.sh
#   Each entry is NAME:VAR=VALUE[,VAR=VALUE...] (nothing after the colon: the defaults). TEST_S
#   applies to the first entry only (the GPU tests run once). The time left is split evenly
#   between the entries still to run.
set -uo pipefail
source bench/device/settings.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${TP_AB_BUDGET:-570}
read -r -a entries <<< "${TP_AB:-default:}"
tests=${TEST_S:-0}
n=${#entries[@]}
for i in "${!entries[@]}"; do
    e=${entries[$i]}
    name=${e%%:*}
    settings=${e#*:}
    left=$(( BUDGET - ($(date +%s) - START) ))
    share=$(( (left - tests) / (n - i) + tests ))
    echo "##### $name ($settings): $share s" | tee -a "$OUT/summary.txt"
    (
        export_settings "$settings"
        OUT="$OUT/$name" TEST_S=$tests TP_BENCH_BUDGET=$share TP_PLAN=regional bash bench/device/tp.sh
    ) > "$OUT/$name.log" 2>&1
    tail -n 12 "$OUT/$name.log"
    [ -f "$OUT/$name/summary.txt" ] && cat "$OUT/$name/summary.txt" >> "$OUT/summary.txt"
    tests=0
done
(cd "$OUT" && tar cf runs.tar "${entries[@]%%:*}" *.log && rm -rf "${entries[@]%%:*}" *.log)
cat "$OUT/summary.txt"
