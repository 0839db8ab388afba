#!/usr/bin/env bash
# Issue 8 on one GPU: `llmopt bench --draft` compiled, on the 7B preset (random weights, random
# prompt: the drafts' floor) and the n-gram target on the default model (real weights,
# bench/cpu/ngram_speedup.sh). The model file travels in two halves, as in bench/device/distill.sh
# (its header makes .devw/):
#   call 1: carry [".devw/part00"]:            cp .devw/part00 /tmp/ && bash bench/device/ngram.sh preset
#   call 2 (within 30 s): carry [".devw/part01", ".devw/whl"]:  bash bench/device/ngram.sh ngram
# Results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
L="python3 -m llmopt.cli.main"
case ${1:-} in
    preset)
        for d in ngram self-layers:8; do
            timeout 200 $L bench --model preset:llama-2-7b --compile --draft $d --new-tokens 200 --runs 3 \
                --json "$OUT/l2-7b_draft_${d/:/}.json" 2>&1 | grep -v -i warn | tee -a "$OUT/log.txt"
        done ;;
    ngram)
        W=.devw G=/tmp/smollm2-135m.Q4_1.gguf
        if ! { [ -f $G ] && [ "$(sha256sum $G | cut -d' ' -f1)" = "$(cat $W/whl/gguf.sha256)" ]; }; then
            [ -f /tmp/part00 ] || { echo "no /tmp/part00 here: the first half did not stay on this machine"; exit 3; }
            cat /tmp/part00 $W/part01 > $G
            [ "$(sha256sum $G | cut -d' ' -f1)" = "$(cat $W/whl/gguf.sha256)" ] || { echo "model file checksum differs"; exit 3; }
        fi
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/whl/*.whl || exit 3
        export PYTHONPATH=/tmp/site:$PYTHONPATH
        LLMOPT="$L" DEVICE=cuda GEN_FLAGS=--compile MODEL=$G RUNS=${RUNS:-5} \
            bash bench/cpu/ngram_speedup.sh "$OUT/ngram_gpu.json" 2>&1 | grep -v -i warn | tee -a "$OUT/log.txt" ;;
    *) echo "usage: bash bench/device/ngram.sh preset|ngram"; exit 2 ;;
esac
