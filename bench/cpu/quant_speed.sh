#!/usr/bin/env bash
# Decode speed and weight bytes of each weight-only format on the default model (real weights),
# CPU, 2 threads, eager float32 activations. Pairs with the quality JSONs in bench/results/quality/.
# gptq/awq store the int4 layout, so their speed is int4-g128's.
# Usage: bash bench/cpu/quant_speed.sh [OUTDIR]   (default bench/results/cpu_quant)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench/results/cpu_quant}
mkdir -p "$OUT"
LLMOPT=${LLMOPT:-.venv/bin/llmopt}
for q in none int8 int4-g32 int4-g64 int4-g128 nf4 fp8; do
    extra=()
    [ "$q" != none ] && extra=(--quant "$q")
    OMP_NUM_THREADS=2 "$LLMOPT" bench --model smollm2-135m --device cpu --dtype float32 "${extra[@]}" \
        --prompt-len 5 --new-tokens 64 --runs 5 --json "$OUT/$q.json" | grep -E "decode tok/s \(per|bytes read"
done
