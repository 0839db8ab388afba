#!/usr/bin/env bash
# Issue 3 on the GPU: gpu tests, then `llmopt bench` on random-weight presets. Results in $OUT.
# Usage (device tool): bash bench/device/decode.sh RUN [RUN ...]   (RUN names below; "tests" runs pytest)
# RUN+regional: the same run with --compile-mode regional (its JSON is RUN_regional.json);
# RUN+fused, RUN+unfused, RUN%V, RUN@K: see the loop below; together in the order RUN[+regional][+fused|+unfused][%V][@K]
# BENCH_FLAGS: added to every bench run (e.g. --debug: tracebacks in log.txt)
set -uo pipefail
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export LLMOPT_CACHE=${LLMOPT_CACHE:-/tmp/llmopt-cache}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B="${PY:-python3} -m llmopt.cli.main bench"
L7=${L7:-"--model preset:llama-2-7b --compile"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

run() {  # name, args...  (output streams into log.txt, so a run cut short still leaves its log)
    local name=$1 t0=$SECONDS; shift
    local limit=${RUN_S:-420}
    if [ -n "${DEADLINE_S:-}" ] && [ $((DEADLINE_S - (SECONDS - T0))) -lt "$limit" ]; then
        limit=$((DEADLINE_S - (SECONDS - T0)))
    fi
    echo "=== $name: llmopt bench $* (limit ${limit} s)" | tee -a "$OUT/log.txt"
    local prof=""; [ "${PROFILE:-0}" = 1 ] && prof="--profile $OUT/prof/$name"
    LLMOPT_CACHE=$LLMOPT_CACHE${SUF:-} timeout "$limit" $B "$@" $EXTRA ${BENCH_FLAGS:-} $prof --json "$OUT/$name.json" 2>&1 | grep --line-buffered -v -e Warning -e "quantising:" >> "$OUT/log.txt"
    echo "    rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
    EST=$((SECONDS - t0 + 15))
}
T0=$SECONDS
EST=${EST_S:-90}  # how long the next run is expected to take: the last run's time; at first EST_S (a 7B bench run takes 45-60 s)
for r in "$@"; do
    EXTRA="" name=$r
    # RUN@K: the same run compiled from scratch into its own cache (-cK), named RUN_cK: repeats
    # show how much the timed autotuning moves the result from one compile to the next
    SUF=""; case $r in *@*) SUF=-c${r##*@} name=${name%@*}_c${r##*@} r=${r%@*} ;; esac
    # RUN%V: the same run with the generated-kernel settings of engine/compile.py (each on by
    # default) changed, in its own cache: V = nopdl (LLMOPT_PDL=0), noapw
    # (LLMOPT_AUTOTUNE_POINTWISE=0) or neither; or kpdl/nokpdl: llmopt's own decode kernels as PDL
    # launches or not, whatever the format (LLMOPT_KERNEL_PDL=1/0; auto, the default, picks by
    # format; LLMOPT_PDL=auto pairs inductor's kernels with them); dd/rd: --dense-gemv rows through
    # the deferred-sum or the few-row kernel (LLMOPT_DENSE_ONE_ROW=deferred, the default, or
    # reduce); pf/nopf: the one-row kernels load each next tile before computing, or never
    # (LLMOPT_GEMV_PREFETCH=1/0; auto, the default, for unquantised rows only); st0/st3/st4/st5: the
    # one-row kernels' K loop software-pipelined over that many stages, st0 the plain loop
    # (LLMOPT_GEMV_STAGES; auto, the default, 3 for int8/fp8 and 0 for int4/nf4); or det:
    # inductor's deterministic mode (TORCHINDUCTOR_DETERMINISTIC=1: no timed kernel choices); named RUN_V
    unset LLMOPT_PDL LLMOPT_AUTOTUNE_POINTWISE LLMOPT_KERNEL_PDL LLMOPT_DENSE_ONE_ROW TORCHINDUCTOR_DETERMINISTIC LLMOPT_GEMV_PREFETCH LLMOPT_GEMV_STAGES
    case $r in *%*) v=${r##*%} r=${r%\%*}; name=${name/\%/_}; SUF=-$v$SUF
        rest=$v  # V is one or more of the names above written together (pfddkpdl: pf, dd, kpdl)
        while [ -n "$rest" ]; do
            case $rest in
                nopdl*) export LLMOPT_PDL=0; rest=${rest#nopdl} ;;
                noapw*) export LLMOPT_AUTOTUNE_POINTWISE=0; rest=${rest#noapw} ;;
                neither*) export LLMOPT_PDL=0 LLMOPT_AUTOTUNE_POINTWISE=0; rest=${rest#neither} ;;
                nokpdl*) export LLMOPT_KERNEL_PDL=0; rest=${rest#nokpdl} ;;
                kpdl*) export LLMOPT_KERNEL_PDL=1; rest=${rest#kpdl} ;;
                dd*) export LLMOPT_DENSE_ONE_ROW=deferred; rest=${rest#dd} ;;
                rd*) export LLMOPT_DENSE_ONE_ROW=reduce; rest=${rest#rd} ;;
                pf*) export LLMOPT_GEMV_PREFETCH=1; rest=${rest#pf} ;;
                nopf*) export LLMOPT_GEMV_PREFETCH=0; rest=${rest#nopf} ;;
                st0*|st3*|st4*|st5*) export LLMOPT_GEMV_STAGES=${rest:2:1}; rest=${rest:3} ;;
                det*) export TORCHINDUCTOR_DETERMINISTIC=1; rest=${rest#det} ;;
                *) break ;;
            esac
        done
        [ -n "$rest" ] && { echo "unknown variant $v"; continue; } ;;
    esac
    case $r in *+regional) r=${r%+regional} name=${name/+regional/_regional} EXTRA="--compile-mode regional" ;; esac
    # RUN+fused: with --fuse-projections (q/k/v and gate/up joined; the default for quantised
    # models since the eleventh session); RUN+unfused: with --no-fuse-projections
    case $r in *+fused) r=${r%+fused} name=${name/+fused/_fused} EXTRA="$EXTRA --fuse-projections" ;;
        *+unfused) r=${r%+unfused} name=${name/+unfused/_unfused} EXTRA="$EXTRA --no-fuse-projections" ;; esac
    # DEADLINE_S: skip runs that would not finish inside the device call
    if [ -n "${DEADLINE_S:-}" ] && [ $((SECONDS - T0 + EST)) -gt "$DEADLINE_S" ]; then
        echo "=== $r skipped: deadline" | tee -a "$OUT/log.txt"; continue
    fi
    case $r in
        tests) timeout ${TEST_S:-240} python3 -m pytest -q -m gpu tests/test_gpu_decode.py -p no:cacheprovider 2>&1 | tail -6 | tee -a "$OUT/log.txt" ;;
        l2-7b_b1) run $name $L7 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_b1_profile) run $name $L7 --prompt-len 5 --new-tokens 200 --runs 3 --profile "$OUT/profile" ;;
        l2-7b_b1_autotune) run $name $L7 --compile-mode max-autotune --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_b1_gemv) run $name $L7 --dense-gemv --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_ctx4000_gemv) run $name $L7 --dense-gemv --prompt-len 3896 --new-tokens 200 --runs 3 ;;
        # --dense-gemv out: only o_proj and down_proj through the one-row kernel (models/gemv_linear.py)
        l2-7b_b1_gemvout) run $name $L7 --dense-gemv out --prompt-len 5 --new-tokens 200 --runs 5 ;;
        # --dense-gemv none: the compiler's matmuls everywhere (before the fourteenth session's default)
        l2-7b_b1_nogemv) run $name $L7 --dense-gemv none --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_ctx4000_nogemv) run $name $L7 --dense-gemv none --prompt-len 3896 --new-tokens 200 --runs 3 ;;
        l2-7b_ctx4000_gemvout) run $name $L7 --dense-gemv out --prompt-len 3896 --new-tokens 200 --runs 3 ;;
        l2-7b_b1_fused) run $name $L7 --fuse-projections --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_b1_nocd) LLMOPT_COORDINATE_DESCENT=0 LLMOPT_CACHE=/tmp/llmopt-cache-nocd run $name $L7 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_ttft1024) run $name $L7 --compile-prefill --prompt-len 1024 --new-tokens 16 --runs 5 ;;
        l2-7b_ctx4000) run $name $L7 --prompt-len 3896 --new-tokens 200 --runs 3 ;;  # 4,096-token context: ~4,000 cached
        l2-7b_b8) run $name $L7 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_b32) run $name $L7 --batch-size 32 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int8) run $name $L7 --quant int8 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int8g32) run $name $L7 --quant int8-g32 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        # 8-bit per-channel GPTQ, quantised on the fly (random calibration tokens: the preset has no
        # tokenizer): int8's format and kernel, so int8's speed; load_s holds the GPTQ time
        l2-7b_gptqw8) run $name $L7 --quant gptq-w8 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int8_torch) LLMOPT_WO_KERNEL=torch run $name $L7 --quant int8 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int4g32) run $name $L7 --quant int4-g32 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int4g128) run $name $L7 --quant int4-g128 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int4g128_b8) run $name $L7 --quant int4-g128 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int4g128_b8_tinygemm) LLMOPT_WO_KERNEL=tinygemm run $name $L7 --quant int4-g128 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int4g32_b8_tinygemm) LLMOPT_WO_KERNEL=tinygemm run $name $L7 --quant int4-g32 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int4g128_mma) LLMOPT_WO_KERNEL=mma run $name $L7 --quant int4-g128 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_nf4_mma) LLMOPT_WO_KERNEL=mma run $name $L7 --quant nf4 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_nf4_b8) run $name $L7 --quant nf4 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_nf4_b8_mma) LLMOPT_WO_KERNEL=mma run $name $L7 --quant nf4 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int4g128_b8_triton) LLMOPT_WO_KERNEL=triton run $name $L7 --quant int4-g128 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int4g128_b8_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant int4-g128 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int8_b8_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant int8 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_int4g32_b8) run $name $L7 --quant int4-g32 --batch-size 8 --prompt-len 5 --new-tokens 200 --runs 3 ;;
        l2-7b_nf4) run $name $L7 --quant nf4 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_fp8) run $name $L7 --quant fp8 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int4g32_tinygemm) LLMOPT_WO_KERNEL=tinygemm run $name $L7 --quant int4-g32 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int4g128_tinygemm) LLMOPT_WO_KERNEL=tinygemm run $name $L7 --quant int4-g128 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int8_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant int8 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int8g32_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant int8-g32 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_nf4_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant nf4 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_nf4_select) LLMOPT_NF4_DECODE=select run $name $L7 --quant nf4 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_fp8_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant fp8 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int4g32_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant int4-g32 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_int4g128_gemv) LLMOPT_WO_KERNEL=triton-gemv run $name $L7 --quant int4-g128 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        # the deferred-sum one-row kernels (LLMOPT_GEMV_ONE_ROW=deferred; integer codes by the exponent trick)
        l2-7b_int8_gemv1|l2-7b_int4g128_gemv1|l2-7b_int4g32_gemv1|l2-7b_nf4_gemv1|l2-7b_fp8_gemv1|l2-7b_int8_gemv1_cvt)
            q=${r#l2-7b_}; q=${q%%_*}; q=${q/int4g/int4-g}
            LLMOPT_WO_KERNEL=triton-gemv LLMOPT_GEMV_ONE_ROW=deferred LLMOPT_INT_DECODE=$([ "${r##*_}" = cvt ] && echo cvt || echo magic) \
                run $name $L7 --quant $q --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_nf4_gemv1_select) LLMOPT_GEMV_ONE_ROW=deferred LLMOPT_NF4_DECODE=select run $name $L7 --quant nf4 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_nf4_prmt) LLMOPT_NF4_DECODE=prmt run $name $L7 --quant nf4 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l2-7b_b1_gemv1) LLMOPT_GEMV_ONE_ROW=deferred run $name $L7 --dense-gemv --prompt-len 5 --new-tokens 200 --runs 5 ;;
        gemv_stages) timeout ${WO_S:-420} python3 bench/device/gemv_stages.py --out "$OUT/gemv_stages.json" --budget-s $(( ${WO_S:-420} - 60 )) ${STAGES_FORMATS:+--formats $STAGES_FORMATS} 2>&1 | tee -a "$OUT/log.txt" ;;
        wo_kernels) timeout ${WO_S:-300} python3 bench/device/wo_kernels.py --out "$OUT/wo_kernels.json" --rows ${WO_ROWS:-1 8} 2>&1 | grep -v " done$" | tee -a "$OUT/log.txt" ;;
        mma_tests) timeout ${TEST_S:-240} python3 -m pytest -q -m gpu tests/test_quant_kernels.py -k "mma" -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt" ;;
        int4_mma) timeout ${WO_S:-300} python3 bench/device/int4_mma.py --out "$OUT/int4_mma.json" --rows ${WO_ROWS:-1 2 8 16} --groups ${WO_GROUPS:-128 32} ${WO_NF4:+--nf4} 2>&1 | grep -v " done$" | tee -a "$OUT/log.txt" ;;
        gemv_tests) timeout 200 python3 -m pytest -q -m gpu tests/test_quant_kernels.py -k "gemv" -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt" ;;
        nf4_tests) timeout 150 python3 -m pytest -q -m gpu tests/test_quant_kernels.py -k "nf4" -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt" ;;
        tinygemm_tests) timeout 120 python3 -m pytest -q -m gpu tests/test_quant_kernels.py -k "tinygemm or gemv" -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt" ;;
        l2-7b_int4g32_torch) LLMOPT_WO_KERNEL=torch run $name $L7 --quant int4-g32 --prompt-len 5 --new-tokens 200 --runs 5 ;;
        # the quantisation GPU tests, the per-shape kernel checks (about 10-20 s each: every
        # autotuning config compiles and is timed) last, so a cut-off run has the model tests
        quant_tests) t=$SECONDS; K="gemv_kernel_matches_reference"
            timeout ${QUANT_TEST_S:-150} python3 -m pytest -q -m gpu tests/test_quant_kernels.py tests/test_quant.py -k "not $K" \
                -p no:cacheprovider -p no:logging 2>&1 | tail -15 | tee -a "$OUT/log.txt"
            left=$(( ${QUANT_TEST_S:-150} - (SECONDS - t) )); [ $left -lt 1 ] && left=1  # (timeout 0: none)
            timeout $left python3 -m pytest -q -m gpu tests/test_quant_kernels.py -k "$K" \
                -p no:cacheprovider -p no:logging 2>&1 | tail -15 | tee -a "$OUT/log.txt" ;;
        # Issue 4: GPTQ / AWQ of the 7B preset on one GPU (random weights, random calibration
        # tokens: the time is real, the quality meaningless), quantisation and saving timed.
        gptq_7b|awq_7b) rm -rf /tmp/q7b; echo "=== $r" | tee -a "$OUT/log.txt"
            timeout ${RUN_S:-420} ${PY:-python3} -m llmopt.cli.main quantize --model preset:llama-2-7b \
                --method ${r%_7b} --group-size 128 --out /tmp/q7b --json "$OUT/$r.json" 2>&1 \
                | grep -v -e Warning -e "quantising" | tail -3 | tee -a "$OUT/log.txt"; rm -rf /tmp/q7b ;;
        # the TP benchmark's TP=1 decode of the same model on the same GPU (same Generator): run
        # next to l2-7b_b1 to tell machine variance from a setup difference (docs/benchmarks.md)
        tpbench_tp1) timeout ${RUN_S:-420} python3 -m llmopt.parallel.tpbench decode --tp 1 --model preset:llama-2-7b \
                --mode regional --out "$OUT/tpbench_tp1.json" 2>&1 | tail -2 | tee -a "$OUT/log.txt" ;;
        l3-8b_b1) run $name --model preset:llama-3-8b --compile --prompt-len 5 --new-tokens 200 --runs 5 ;;
        l3-8b_b1_nogemv) run $name --model preset:llama-3-8b --compile --dense-gemv none --prompt-len 5 --new-tokens 200 --runs 5 ;;
        *) echo "unknown run $r" ;;
    esac
done
for f in "$OUT"/prof/*/top_kernels.txt; do  # PROFILE=1: each run's top kernels into the log
    [ -f "$f" ] && { echo "=== top kernels: $(basename "$(dirname "$f")")"; head -14 "$f" | cut -c1-57,128-242; } >> "$OUT/log.txt"
done
rm -rf "$OUT/prof"
[ -f "$OUT/profile/top_kernels.txt" ] && cat "$OUT/profile/top_kernels.txt" >> "$OUT/log.txt" && head -30 "$OUT/profile/top_kernels.txt" | cut -c1-160
rm -rf "$OUT/profile"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':<18} {'tok/s':>7} {'batch':>8} {'roof%':>6} {'GB/s':>6} {'TTFT ms':>8} {'compile':>8} {'start>1st':>9} {'start>run':>9}")
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    if "decode_tokens_per_s" not in r:
        continue  # wo_kernels.json: its table is in the log
    print(f"{f.stem:<18} {r['decode_tokens_per_s']:7.1f} {r['total_tokens_per_s']:8.1f} "
          f"{100*(r['roofline_fraction'] or 0):6.1f} {r['achieved_gb_per_s']:6.0f} {1000*r['ttft_s']:8.1f} "
          f"{(r['compile_s'] or 0):8.1f} {r['start_to_first_token_s']:9.1f} {r['start_to_first_run_done_s']:9.1f}")
PY
# The device tool returns at most 8 files: TAR=1 packs the JSONs into one archive.
if [ "${TAR:-0}" = 1 ]; then (cd "$OUT" && tar cf runs.tar *.json && rm -f *.json); fi
