#!/usr/bin/env bash
# n-gram (prompt lookup) speculative decoding on the default model, CPU, on prompts that hold a
# passage the answer repeats (the opening of the packaged prideprejudice.txt): "chat" asks the
# chat model to repeat it (it paraphrases), "copy" gives the passage, a separator and its first
# line, so the greedy continuation copies it. Greedy; --speculate-compare also decodes without
# speculation and reports the speedup. Also the self-layers:8 draft on the chat prompt.
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
MODEL_FLAGS=(); [ -n "${MODEL:-}" ] && MODEL_FLAGS=(--model "$MODEL")
PASSAGE=$(sed -n 10,24p src/llmopt/data/prideprejudice.txt)
PROMPT="Repeat the following passage word for word.

$PASSAGE"
COPY="$PASSAGE

---

$(sed -n 10p src/llmopt/data/prideprejudice.txt)"
mkdir -p "$(dirname "$OUT")"
gen() {  # name, draft, extra args...
    local name=$1 spec=$2; shift 2
    # shellcheck disable=SC2086  # LLMOPT and GEN_FLAGS may hold several words
    OMP_NUM_THREADS=2 $LLMOPT generate --device "$DEVICE" "${MODEL_FLAGS[@]}" $GEN_FLAGS "$@" --temperature 0 --max-new-tokens 160 \
        --draft "$spec" --speculate-k 4 --speculate-compare --json > "${OUT%.json}.$name.raw.json"
}
gen chat-ngram ngram --chat --prompt "$PROMPT"
gen copy-ngram ngram --prompt "$COPY"
gen chat-self-layers8 self-layers:8 --chat --prompt "$PROMPT"
python3 - "$OUT" "$DEVICE" "$GEN_FLAGS" <<'PY'
import json, sys
out, device, flags = sys.argv[1:4]
where = "cpu (2 threads), float32, eager" if device == "cpu" else f"{device}, {flags or 'eager'}"
res = {"command": f"DEVICE={device} GEN_FLAGS='{flags}' bash bench/cpu/ngram_speedup.sh {out}",
       "model": "smollm2-135m (real weights)", "device": where, "runs": {}}
for name in ("chat-ngram", "copy-ngram", "chat-self-layers8"):
    r = json.load(open(out[:-5] + f".{name}.raw.json"))
    res["runs"][name] = {"speculative": r.get("speculative"), "stats": r.get("stats"), "text": r.get("text")}
json.dump(res, open(out, "w"), indent=2)
for name, r in res["runs"].items():
    s = r["speculative"] or {}
    print(name, {k: s.get(k) for k in ("mean_tokens_per_step", "acceptance_rate", "plain_decode_tokens_per_s",
                                       "speculative_decode_tokens_per_s", "speedup", "same_tokens_as_plain")})
PY
rm -f "${OUT%.json}".*.raw.json
