#!/usr/bin/env bash
# Speculative decoding on one GPU (issue 8): preset:llama-2-7b (random weights) bf16, batch 1,
# 5-token prompt, 200 new tokens, greedy; eager, then compiled (CUDA graphs) while time lasts. Plain decode; replay drafter at k=4 (ceiling,
# target >= 3.5x); always-rejected drafter (floor, target <= 10% overhead), fixed and adaptive k;
# self-int4 and self-layers:8 at their measured acceptance. Results: $OUT/speculative_device.json.
set -euo pipefail
OUT="${OUT:-/tmp/speculative_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
BUDGET_S=${BUDGET_S:-300}  # no new case starts after this; the whole run ends within BUDGET_S + 45 s
timeout $((BUDGET_S + 45)) python3 bench/device/speculative.py device --model preset:llama-2-7b --dtype bfloat16 \
    --prompt-tokens 5 --new-tokens 200 --k 4 --compile --compile-mode "${COMPILE_MODE:-regional}" \
    --budget-s "$BUDGET_S" --out "$OUT" 2> "$OUT/speculative.log"
