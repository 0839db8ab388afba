#!/usr/bin/env bash
# On nvidia-h200-x2: the TP GPU tests (both GPUs), then the same decode.sh runs on both GPUs at
# once, one GPU per setting, for a same-machine A/B. Results under $OUT/{a,b} packed in ab.tar.
# Usage: AB_A="TORCHINDUCTOR_DETERMINISTIC=1" AB_B="" TP_TEST_S=150 DEADLINE_S=380 \
#        bash bench/device/ab_pair.sh RUN [RUN ...]      (RUN names: decode.sh)
#   AB_A / AB_B: VAR=VALUE[,VAR=VALUE...] exported for GPU 0 / GPU 1 (empty: the defaults).
set -uo pipefail
source bench/device/settings.sh
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "${TP_TEST_S:-0}" != 0 ]; then
    LLMOPT_TP_TEST_S=$(( TP_TEST_S - 10 )) timeout "$TP_TEST_S" python3 -m pytest -q -m gpu \
        tests/test_parallel_gpu.py -p no:cacheprovider > "$OUT/tp_tests.log" 2>&1
    tail -n 12 "$OUT/tp_tests.log" | cut -c1-1500
fi
side() {  # gpu, settings, folder, runs...
    local gpu=$1 settings=$2 dir=$3; shift 3
    (
        export_settings "$settings"
        CUDA_VISIBLE_DEVICES=$gpu OUT="$OUT/$dir" LLMOPT_CACHE=/tmp/llmopt-cache-$dir TAR=1 \
            bash bench/device/decode.sh "$@" > "$OUT/$dir.txt" 2>&1
    )
}
side 0 "${AB_A:-}" a "$@" &
side 1 "${AB_B:-}" b "$@" &
wait
echo "##### a: ${AB_A:-defaults}"; tail -n 12 "$OUT/a.txt"
echo "##### b: ${AB_B:-defaults}"; tail -n 12 "$OUT/b.txt"
(cd "$OUT" && tar cf ab.tar a b a.txt b.txt && rm -rf a b a.txt b.txt)
