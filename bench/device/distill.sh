#!/usr/bin/env bash
# Issue 8 on one GPU: distil a draft for the default model (SmolLM2-135M, real weights) on
# emma.txt, then measure its greedy speculative acceptance on prideprejudice.txt prompts.
#
# The model file (98 MB) is over one call's 64 MiB, so it travels in two halves, in two calls
# to the same warm machine (/tmp is kept between calls; carried paths are not):
#   here:   echo /.devw/ >> .git/info/exclude; mkdir -p .devw/whl
#           G=$(python -c 'from llmopt.loading.resolve import known_model_gguf as k; print(k("smollm2-135m"))')
#           split -b 49181216 -d "$G" .devw/part; sha256sum "$G" | cut -d' ' -f1 > .devw/whl/gguf.sha256
#           pip download --no-deps --only-binary=:all: --python-version 3.12 -d .devw/whl gguf==0.19.0
#           cp ../shared/corpora/emma.txt .devw/whl/      (optional: the whole novel)
#   call 1: carry [".devw/part00"], command: cp .devw/part00 /tmp/ && PYTHONPATH=src python3 -m pytest -q -m gpu
#           tests/test_gpu_decode.py -k distill   (if that fails: DISTILL_ARGS=--no-compile-teacher)
#           (within 30 s of it returning:)
#   call 2: carry [".devw/part01", ".devw/whl"], command: bash bench/device/distill.sh
#   call 3 (optional, same machine, carry [".devw/whl"]): DISTILL_RESUME=1 DISTILL_LR=5e-4 bash bench/device/distill.sh
# Results in $OUT: distill.json (training run), acceptance_*.json, log.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W=.devw
G=/tmp/smollm2-135m.Q4_1.gguf
LIMIT=${DISTILL_S:-310}          # seconds for the whole distill run (the step count is cut to fit)
LAYERS=${DISTILL_LAYERS:-12}
PROMPTS=${DISTILL_PROMPTS:-16384}  # teacher continuations to train on (generated compiled, 1,024 at a time)
# The whole of emma.txt when it travelled (cp ../shared/corpora/emma.txt .devw/whl/), else the
# package's excerpt (its first 300 KB).
CORPUS=src/llmopt/data/emma.txt
[ -f $W/whl/emma.txt ] && CORPUS=$W/whl/emma.txt
END_S=${END_S:-555}             # the whole script ends by then (the device call allows 600)
P0=/tmp/part00  # left there by call 1
SUM=$(cat $W/whl/gguf.sha256)
if ! { [ -f $G ] && [ "$(sha256sum $G | cut -d' ' -f1)" = "$SUM" ]; }; then  # not yet joined here
    [ -f $P0 ] || { echo "no $P0 here: the first half did not stay on this machine"; exit 3; }
    cat $P0 $W/part01 > $G
    [ "$(sha256sum $G | cut -d' ' -f1)" = "$SUM" ] || { echo "model file checksum differs"; exit 3; }
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/log.txt"

S=/tmp/student
# A second call on the same warm machine can go on training: DISTILL_RESUME=1 starts from the
# last call's student, and the teacher's continuations come back from /tmp/policy.pt.
RESUME=()
if [ "${DISTILL_RESUME:-0}" = 1 ] && [ -f $S/config.json ]; then
    rm -rf /tmp/student_prev && mv $S /tmp/student_prev && RESUME=(--resume /tmp/student_prev)
fi
timeout $((LIMIT + 60)) python3 -m llmopt.cli.main --debug distill --teacher $G --layers "$LAYERS" --init-layers first \
    --corpus "$CORPUS" --steps 20000 --time-limit "$LIMIT" --batch-size 32 --seq-len 256 \
    --lr "${DISTILL_LR:-1e-3}" --warmup-steps 100 --checkpoint-every 0 --on-policy 0.9 --policy-prompts "$PROMPTS" \
    --policy-prompt-len 64 --policy-new-tokens 208 --policy-cache /tmp/policy.pt "${RESUME[@]}" ${DISTILL_ARGS:-} \
    --out $S --device cuda 2>&1 \
    | tee -a "$OUT/log.txt"
cp $S/distill.json "$OUT/distill.json" 2>/dev/null
A="python3 bench/device/speculative.py acceptance --model $G --draft $S --device cuda --text src/llmopt/data/prideprejudice.txt"
# The CPU runs' setting (8 prompts, 64 tokens, 48 new, k = 4 fixed, eager), then the wall-clock
# case: 32 prompts, 128 new tokens, adaptive k, compiled plain/verify/draft steps.
# DISTILL_MEASURE: which of the runs below: eager, compiled, long, adaptive (default: all but long;
# "none" or "compiled" alone leaves more of the call to training, when a later call goes on
# training the same student)
M=" ${DISTILL_MEASURE:-eager compiled adaptive} "
[[ $M == *" eager "* ]] && timeout 60 $A --fixed-k --out "$OUT/acceptance_k4.json" 2>&1 | tail -1 | cut -c1-600 | tee -a "$OUT/log.txt"
# The target's setting on more text (k = 4 fixed, 32 prompts x 96 new tokens), compiled steps:
[[ $M == *" compiled "* ]] && timeout $((END_S - 60 - SECONDS)) $A --fixed-k --prompts 32 --new-tokens 96 --compile --out "$OUT/acceptance_k4_compiled_32x96.json" 2>&1 | tail -1 | cut -c1-600 | tee -a "$OUT/log.txt"
# The same at the issues' usual decode length, 200 new tokens:
[[ $M == *" long "* ]] && timeout $((END_S - 30 - SECONDS)) $A --fixed-k --prompts 32 --new-tokens 200 --compile --out "$OUT/acceptance_k4_compiled_32x200.json" 2>&1 | tail -1 | cut -c1-600 | tee -a "$OUT/log.txt"
[[ $M == *" adaptive "* ]] && timeout $((END_S - 5 - SECONDS)) $A --prompts 32 --new-tokens 128 --compile --out "$OUT/acceptance_k4_adaptive_compiled_32x128.json" 2>&1 | tail -1 | cut -c1-600 | tee -a "$OUT/log.txt"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
d = json.loads((out / "distill.json").read_text()) if (out / "distill.json").exists() else {}
print("steps", d.get("steps_run"), "train_s", d.get("train_seconds"), "gen_s", d.get("teacher_generation_seconds"))
print("held-out after", d.get("held_out_after"), "policy after", d.get("held_out_policy_after"))
for f in sorted(out.glob("acceptance_*.json")):
    r = json.loads(f.read_text())
    print(f.name, "accepted/step", r["mean_accepted_per_step"], "full-k", r.get("mean_accepted_per_full_step"), "by position", r["acceptance_by_position"],
          "speedup", r["speedup"], "equal", r["greedy_equal_to_plain"], "compiled", r.get("compiled"))
PY
