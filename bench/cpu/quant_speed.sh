#!/usr/bin/env bash
# Decode speed and weight bytes of each weight-only format on the default model (real weights),
# CPU, 2 threads. Pairs with the quality JSONs in bench/results/quality/.
# gptq/awq store the int4 layout, so their speed is int4-g128's.
# Usage: bash bench/cpu/quant_speed.sh [OUTDIR]   (default bench/results/cpu_quant: float32, eager;
#        FORMATS="int8 int8-g32" runs only those)
#        DTYPE=bfloat16 COMPILE=1 bash bench/cpu/quant_speed.sh bench/results/cpu_quant_bf16_compiled
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench/results/cpu_quant}
mkdir -p "$OUT"
LLMOPT=${LLMOPT:-.venv/bin/llmopt}
for q in ${FORMATS:-none int8 int8-g32 int4-g32 int4-g64 int4-g128 nf4 fp8}; do
    extra=()
    [ "$q" != none ] && extra=(--quant "$q")
    [ "${COMPILE:-0}" = 1 ] && extra+=(--compile)
    echo "== $q"
    OMP_NUM_THREADS=2 "$LLMOPT" bench --model smollm2-135m --device cpu --dtype "${DTYPE:-float32}" "${extra[@]}" \
        --prompt-len 5 --new-tokens 64 --runs 5 --json "$OUT/$q.json" | grep -E "decode tok/s \(per|bytes read"
done
