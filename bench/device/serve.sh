#!/usr/bin/env bash
# Serving benchmark (issue 5) on one H100: preset:llama-2-7b (random weights) in bfloat16, driven
# in-process (FastAPI/uvicorn are not installed on the device machine).
#   1. offline: 512 requests, prompts uniform 64-512 tokens, 256 output tokens -> output tokens/s
#   2. Poisson arrivals at 4 req/s for ~60 s (240 requests) -> median TTFT and TPOT
#   3. a shared 1,000-token system prompt (+32-64 own tokens, 64 output), prefix caching on vs off
# Writes JSON and logs under $OUT; prints a summary table last. Budget: under 6 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/llmopt-serve-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
BENCH="$PY -m llmopt.cli.main bench-serve --model ${MODEL:-preset:llama-2-7b} --dtype bfloat16 --device ${DEVICE:-cuda} \
  --backend engine --max-model-len 2048 --gpu-memory-utilization 0.9 ${TP:+--tp $TP}"
# Issue 6's serving number on nvidia-h200-x2: MODEL=preset:llama-2-13b TP=2 bash bench/device/serve.sh
# (and MODEL=preset:llama-2-13b for the TP=1 baseline)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1

# Kernel and CUDA-graph correctness first (fast): the Triton kernel against its reference.
if $PY -c "import pytest" 2>/dev/null; then
  timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_paged_attention.py tests/test_engine.py \
    -k "triton or cuda" > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"
else
  echo "pytest not installed: skipped" > "$OUT/gpu_tests.log"
fi

run() {  # name timeout args...
  local name=$1 limit=$2
  shift 2
  echo "== $name" >&2
  timeout "$limit" $BENCH --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 4 "$OUT/$name.log" >&2
}

run offline 110 --num-requests 512 --input-len 64 512 --output-len 256 256
run poisson_4rps 100 --num-requests 240 --request-rate 4 --input-len 64 512 --output-len 256 256
run prefix_on 50 --num-requests 256 --shared-prefix-len 1000 --input-len 32 64 --output-len 64 64
run prefix_off 70 --num-requests 256 --shared-prefix-len 1000 --input-len 32 64 --output-len 64 64 \
  --no-prefix-caching

$PY - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
rows = []
for name in ("offline", "poisson_4rps", "prefix_on", "prefix_off"):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        rows.append((name, None)); continue
    rows.append((name, json.load(open(path))["results"]))
summary = {n: r for n, r in rows}
on, off = summary.get("prefix_on"), summary.get("prefix_off")
if on and off and off["output_tokens_per_s"]:
    summary["prefix_speedup"] = on["output_tokens_per_s"] / off["output_tokens_per_s"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(open(os.path.join(out, "gpu_tests.log")).read().strip().splitlines()[-2:])
print(f"{'run':<14}{'ok/fail':>9}{'out tok/s':>11}{'tot tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
      f"{'TPOT p50':>10}{'TPOT p99':>10}{'KV max':>8}{'hit':>6}{'preempt':>8}")
def f(x, spec): return "-" if x is None else format(x, spec)
for name, r in rows:
    if r is None:
        print(f"{name:<14}  (no result: see {name}.log)"); continue
    print(f"{name:<14}{str(r['completed'])+'/'+str(r['failed']):>9}{r['output_tokens_per_s']:>11.0f}"
          f"{r['total_tokens_per_s']:>11.0f}{f(r['ttft_ms']['p50'], '.1f'):>10}{f(r['ttft_ms']['p99'], '.1f'):>10}"
          f"{f(r['tpot_ms']['p50'], '.2f'):>10}{f(r['tpot_ms']['p99'], '.2f'):>10}"
          f"{f(r.get('kv_usage_max'), '.0%'):>8}{f(r.get('prefix_cache_hit_rate'), '.2f'):>6}"
          f"{f(r.get('preemptions'), 'd'):>8}")
if "prefix_speedup" in summary:
    print(f"prefix caching speedup (output tok/s, on/off): {summary['prefix_speedup']:.2f}x  (target >= 2x)")
print("targets: offline >= 6000 out tok/s; 4 req/s: TTFT p50 <= 100 ms, TPOT p50 <= 25 ms")
PYEOF
