#!/usr/bin/env bash
# Issue 6 on nvidia-h200-x2: tensor parallelism. Everything under $OUT (JSON + logs), summary last.
#   1. all-reduce micro-benchmark: 8 KB bf16 (batch-1 decode's message), eager and inside a CUDA
#      graph, NCCL vs PyTorch symmetric memory one-shot / two-shot (correctness checked first);
#      plus the device copy bandwidth;
#   2. batch-1 decode (5-token prompt, 200 new tokens, median of 3) of preset:llama-2-7b and -13b at
#      TP=1 and TP=2, and preset:llama-2-70b at TP=2. Mode "graph" = the eager decode step captured
#      in one CUDA graph (no compiler, quick to set up); mode "compile" = the project's compiled
#      decode (engine.generate.Generator(compile=True), reduce-overhead), run if time remains.
# Usage (device tool, kind nvidia-h200-x2): bash bench/device/tp.sh        (about 7-8 minutes)
#   TP_PLAN=regional bash bench/device/tp.sh: GPU tests, then decode with --mode regional instead
#   (TEST_S=0: no tests; TP_MODELS="preset:llama-2-13b": those models only; TP_ALLREDUCE=symm-one-shot;
#   LLMOPT_COORDINATE_DESCENT=0: no coordinate-descent tuning; TORCHINDUCTOR_DETERMINISTIC=1: no
#   timing-based kernel choices at all, so both ranks compile the same configs)
set -uo pipefail
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export LLMOPT_CACHE=${LLMOPT_CACHE:-/tmp/llmopt-cache}
# NVLink multicast must stay off on these machines (the ranks force these too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
BUDGET=${TP_BENCH_BUDGET:-450}  # seconds for all steps together
START=$(date +%s)
B="python3 -m llmopt.parallel.tpbench"

LOG="$OUT/tp.log"  # every step's output in one file (the device tool returns at most 8 files)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvidia-smi topo -m
  python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())"
} 2>&1 | tee "$LOG"

step() {  # name, min-seconds-needed, args...
    local name=$1 need=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < need )); then echo "=== $name: skipped ($left s left, needs $need)"; return; fi
    echo "=== $name: $* (limit $left s)" | tee -a "$LOG"
    timeout "$left" $B "$@" --out "$OUT/$name.json" > "$OUT/step.log" 2>&1
    echo "    rc=$? ($(( $(date +%s) - START )) s elapsed)" | tee -a "$OUT/step.log"
    cat "$OUT/step.log" >> "$LOG"; tail -n 12 "$OUT/step.log"; rm -f "$OUT/step.log"
}

if [ "${TP_PLAN:-graph}" = regional ]; then
    # Regional compilation (one compiled layer for all, the step captured whole): short cold
    # compiles, so 13B and 70B fit a call. GPU tests first (TP=2 regional against TP=1 included).
    # Each compiled run is profiled once more per rank (top-kernels tables, packed in profile.tar).
    # TEST_S=0 skips the tests; the fixture's own deadline (LLMOPT_TP_TEST_S) ends them first,
    # so a slow or stuck stage is named in the log rather than cut off silently.
    if [ "${TEST_S:-180}" != 0 ]; then
        LLMOPT_TP_TEST_S=$(( ${TEST_S:-180} - 20 )) timeout ${TEST_S:-180} python3 -m pytest -q -m gpu \
            tests/test_parallel_gpu.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
        tail -n 8 "$OUT/tests.log" | cut -c1-2000 | tee -a "$LOG"
        grep -m1 -A3 "stages reached" "$OUT/tests.log" | cut -c1-3000 | tee -a "$LOG"
    fi
    P="--profile $OUT/profile"
    # TP_MODELS: the TP=2 models (default 7B, 13B, 70B); TP=1 runs the ones that fit one GPU
    M2=${TP_MODELS:-"preset:llama-2-7b preset:llama-2-13b preset:llama-2-70b"}
    M1=$(for m in $M2; do [ "$m" != preset:llama-2-70b ] && echo --model $m; done)
    # TP_DENSE_GEMV=none|out|all: which bf16 linears take llmopt's one-row kernel at both sizes
    # (unset: tpbench's auto, o_proj and down_proj at TP=1 on Hopper and none at TP=2)
    DG=${TP_DENSE_GEMV:+--dense-gemv $TP_DENSE_GEMV}
    [ -n "$M1" ] && step tp1_regional 60 decode --tp 1 $M1 --mode regional $P $DG
    step tp2_regional 90 decode --tp 2 $(for m in $M2; do echo --model $m; done) --mode regional \
        --allreduce ${TP_ALLREDUCE:-nccl --allreduce symm-one-shot} $P $DG
    echo "=== summary"
    $B summary "$OUT"/*.json | tee "$OUT/summary.txt"
    [ -d "$OUT/profile" ] && (cd "$OUT" && tar cf profile.tar profile && rm -rf profile)
    # The device tool returns at most 8 files per call: TAR=1 packs the JSON files and the
    # profiles into one archive (two tp.sh runs in one call, each with its own OUT, then fit)
    if [ "${TAR:-0}" = 1 ]; then
        (cd "$OUT" && f=$(ls *.json profile.tar 2>/dev/null); [ -n "$f" ] && tar cf runs.tar $f && rm -f $f)
    fi
    exit 0
fi
step allreduce 30 allreduce --tp 2 --numel 4096 --numel 65536
step tp1_graph 60 decode --tp 1 --model preset:llama-2-7b --model preset:llama-2-13b --mode graph
step tp2_graph 90 decode --tp 2 --model preset:llama-2-7b --model preset:llama-2-13b --model preset:llama-2-70b \
    --mode graph --allreduce nccl --allreduce symm-one-shot --allreduce symm-two-shot
step tp1_compile 100 decode --tp 1 --model preset:llama-2-7b --mode compile
step tp2_compile 130 decode --tp 2 --model preset:llama-2-7b --mode compile --allreduce nccl --allreduce symm-one-shot

echo "=== summary"
$B summary "$OUT"/*.json | tee "$OUT/summary.txt"
# Files back: tp.log, summary.txt and up to 5 JSON files.
