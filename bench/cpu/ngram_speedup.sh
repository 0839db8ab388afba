#!/usr/bin/env bash
# n-gram (prompt lookup) speculative decoding on the default model, on prompts that hold a
# passage the answer repeats (the opening of the packaged prideprejudice.txt): "chat" asks the
# chat model to repeat it (it paraphrases), "copy" gives the passage, a separator and its first
# line, so the greedy continuation copies it. Also the self-layers:8 draft on the chat prompt.
# Each is `llmopt bench --draft D --prompt-file F`: greedy, stopping at end-of-sequence, plain
# and speculative decoding interleaved in each timed run, medians of RUNS (default 3) runs.
# Usage: bash bench/cpu/ngram_speedup.sh [OUT.json]
# On a GPU (e.g. in the device calls of bench/device/distill.sh, which leave the model file in
# /tmp): LLMOPT="python3 -m llmopt.cli.main" DEVICE=cuda GEN_FLAGS=--compile
#   MODEL=/tmp/smollm2-135m.Q4_1.gguf bash bench/cpu/ngram_speedup.sh $OUT/ngram_gpu.json
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench/results/speculative/ngram_cpu.json}
LLMOPT=${LLMOPT:-.venv/bin/llmopt}
DEVICE=${DEVICE:-cpu}
GEN_FLAGS=${GEN_FLAGS:-}  # e.g. --compile
RUNS=${RUNS:-3}
MODEL_FLAGS=(); [ -n "${MODEL:-}" ] && MODEL_FLAGS=(--model "$MODEL")
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
PASSAGE=$(sed -n 10,24p src/llmopt/data/prideprejudice.txt)
printf 'Repeat the following passage word for word.\n\n%s' "$PASSAGE" > "$TMP/chat.txt"
printf '%s\n\n---\n\n%s' "$PASSAGE" "$(sed -n 10p src/llmopt/data/prideprejudice.txt)" > "$TMP/copy.txt"
mkdir -p "$(dirname "$OUT")"
run() {  # name, draft, prompt file, extra args...
    local name=$1 spec=$2 file=$3; shift 3
    # shellcheck disable=SC2086  # LLMOPT and GEN_FLAGS may hold several words
    OMP_NUM_THREADS=2 $LLMOPT bench --device "$DEVICE" "${MODEL_FLAGS[@]}" $GEN_FLAGS "$@" --new-tokens 160 \
        --runs "$RUNS" --draft "$spec" --speculate-k 4 --prompt-file "$file" --json "${OUT%.json}.$name.raw.json" >&2
}
run chat-ngram ngram "$TMP/chat.txt" --chat
run copy-ngram ngram "$TMP/copy.txt"
run chat-self-layers8 self-layers:8 "$TMP/chat.txt" --chat
python3 - "$OUT" "$DEVICE" "$GEN_FLAGS" "$RUNS" <<'PY'
import json, sys
out, device, flags, runs = sys.argv[1:5]
res = {"command": f"DEVICE={device} GEN_FLAGS='{flags}' RUNS={runs} bash bench/cpu/ngram_speedup.sh {out}",
       "model": "smollm2-135m (real weights)", "runs": {}}
for name in ("chat-ngram", "copy-ngram", "chat-self-layers8"):
    res["runs"][name] = json.load(open(out[:-5] + f".{name}.raw.json"))
json.dump(res, open(out, "w"), indent=2)
for name, r in res["runs"].items():
    s = r["speculative"]
    print(f"{name:18} {r['device']}, {r['compile_mode'] or 'eager'}: plain {r['plain_decode_tokens_per_s']:.1f} "
          f"tok/s, speculative {r['speculative_decode_tokens_per_s']:.1f}, speedup {r['speedup']:.2f}x, "
          f"{s['mean_tokens_per_step']:.2f} tokens per step, same tokens {r['same_tokens_as_plain']}")
PY
rm -f "${OUT%.json}".*.raw.json
