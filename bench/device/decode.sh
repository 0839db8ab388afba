#!/usr/bin/env bash
# Issue 3 on the GPU: gpu tests, then `llmopt bench` on random-weight presets. Results in $OUT.
# Usage (device tool): bash bench/device/decode.sh [quick|full]
set -uo pipefail
MODE=${1:-quick}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export LLMOPT_CACHE=${LLMOPT_CACHE:-/tmp/llmopt-cache}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B="python3 -m llmopt.cli.main bench"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu tests/test_gpu_decode.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

run() {  # name, args...
    local name=$1; shift
    echo "=== $name: $*"
    timeout 400 $B "$@" --json "$OUT/$name.json" 2>&1 | tail -25 | tee "$OUT/$name.txt"
}
run l2-7b_b1_cold --model preset:llama-2-7b --compile --batch-size 1 --prompt-len 5 --new-tokens 200 --runs 5
run l2-7b_b1_warm --model preset:llama-2-7b --compile --batch-size 1 --prompt-len 5 --new-tokens 200 --runs 5
if [ "$MODE" = full ]; then
    run l3-8b_b1 --model preset:llama-3-8b --compile --prompt-len 5 --new-tokens 200 --runs 5
    run l2-7b_ctx4000 --model preset:llama-2-7b --compile --prompt-len 4000 --new-tokens 200 --runs 3
    run l2-7b_ttft1024 --model preset:llama-2-7b --compile --prompt-len 1024 --new-tokens 16 --runs 5
    run l2-7b_b8 --model preset:llama-2-7b --compile --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3
    run l2-7b_b32 --model preset:llama-2-7b --compile --batch-size 32 --prompt-len 5 --new-tokens 200 --runs 3
fi
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':<18} {'tok/s':>8} {'batch tok/s':>11} {'roof%':>6} {'GB/s':>7} {'TTFT ms':>8} {'compile s':>9} {'start->1st s':>12}")
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem:<18} {r['decode_tokens_per_s']:8.1f} {r['total_tokens_per_s']:11.1f} "
          f"{100*(r['roofline_fraction'] or 0):6.1f} {r['achieved_gb_per_s']:7.0f} {1000*r['ttft_s']:8.1f} "
          f"{(r['compile_s'] or 0):9.1f} {r['start_to_first_token_s']:12.1f}")
PY
