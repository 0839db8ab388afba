#!/usr/bin/env bash
# Adaptive k on one GPU, in one device call with no model transfer (preset weights): the GPU
# speculation tests (and the fused-projection test of 8-bit GPTQ), then `llmopt bench --draft`
# on the default model's shape with random weights, adaptive k (measured step costs, probe
# back-off, sync-free plain steps) against k fixed, for n-gram drafts and an always-failing
# self-draft. Results in $OUT.
# Usage (device tool): bash bench/device/spec_adaptive.sh
set -uo pipefail
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/log.txt"
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_decode.py -k "speculation or gptq" 2>&1 | tail -3 | tee -a "$OUT/log.txt"
B="python3 -m llmopt.cli.main bench --model preset:smollm2-135m --compile --new-tokens 200 --runs 3"
for draft in ngram self-layers:8; do
    name=${draft//:/}
    for mode in adaptive fixed; do
        flag=""; [ $mode = fixed ] && flag=--fixed-k
        echo "=== $draft $mode" | tee -a "$OUT/log.txt"
        timeout 100 $B --draft "$draft" $flag --json "$OUT/${name}_$mode.json" 2>&1 | grep -v Warn | tail -13 | tee -a "$OUT/log.txt"
    done
done
