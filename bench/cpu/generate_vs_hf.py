"""CPU decode speed of llmopt against Hugging Face transformers' generate, same weights.

Runs every configuration in one process, interleaved, so all see the same machine load:
llmopt eager float32, llmopt compiled (inductor, frozen weights) float32 and bfloat16, and
transformers' generate in float32 (the issue's baseline) and bfloat16. Greedy, end-to-end
tokens/s including prefill. Also times the default model's first-use conversion (fresh cache)
and a warm load. What bfloat16 costs in quality: bench/results/quality/cpu-bf16.json.

    python bench/cpu/generate_vs_hf.py --json bench/results/cpu_generate_vs_hf.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _before_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # First-use conversion in a fresh cache, in a child process (as a user would see it).
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LLMOPT_CACHE": cache}
        code = ("import time; t=time.perf_counter(); from llmopt.loading.resolve import resolve_model; "
                "resolve_model('smollm2-135m', progress=False); print(time.perf_counter()-t)")
        conv_s = float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                      capture_output=True, text=True).stdout.strip())
        # a warm load in a fresh process: torch's import, then load_model itself
        code2 = ("import time; t=time.perf_counter(); import torch; t1=time.perf_counter(); "
                 "from llmopt.loading.loader import load_model; t2=time.perf_counter(); "
                 "load_model('smollm2-135m', device='cpu', progress=False); "
                 "print(t1-t, time.perf_counter()-t2)")
        import_s, load_s = (float(x) for x in subprocess.run(
            [sys.executable, "-c", code2], env=env, check=True, capture_output=True, text=True
        ).stdout.split())

    from transformers import AutoModelForCausalLM

    from llmopt.engine.generate import Generator
    from llmopt.loading.loader import load_model
    from llmopt.loading.resolve import resolve_model
    from llmopt.sampling import SamplingParams

    model_dir = resolve_model("smollm2-135m", progress=False)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    runners: dict[str, object] = {}
    compile_s: dict[str, float] = {}
    texts: dict[str, list[int]] = {}
    prompt: list[int] = []
    eos: set[int] = set()

    def ours(dtype: str, compile: bool):
        nonlocal prompt, eos
        lm = load_model(str(model_dir), device="cpu", dtype=dtype, progress=False)
        prompt = lm.tokenizer.encode("The capital of France is")
        eos = set(lm.tokenizer.eos_token_ids)
        gen = Generator(lm.model, lm.tokenizer, torch.device("cpu"), compile=compile,
                        max_seq_len=256 if compile else None)

        def run() -> tuple[float, list[int]]:
            t0 = time.perf_counter()
            out = gen.generate([prompt], params)[0]
            total = time.perf_counter() - t0
            assert len(out.token_ids) == args.new_tokens
            return args.new_tokens / total, out.token_ids
        return run

    def hf(dtype: torch.dtype):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

        def run() -> tuple[float, list[int]]:
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=0)
            total = time.perf_counter() - t0
            assert out.shape[1] - len(prompt) == args.new_tokens
            return args.new_tokens / total, out[0, len(prompt):].tolist()
        return run

    # name -> runner; the first run of each is its warm-up (and, compiled, its compile)
    configs = {
        "llmopt_fp32_eager": lambda: ours("float32", False),
        "llmopt_fp32_compiled": lambda: ours("float32", True),
        "llmopt_bf16_compiled": lambda: ours("bfloat16", True),
        "hf_fp32": lambda: hf(torch.float32),
        "hf_bf16": lambda: hf(torch.bfloat16),
    }
    for name, make in configs.items():
        runners[name] = make()
        t0 = time.perf_counter()
        _, texts[name] = runners[name]()
        compile_s[name] = time.perf_counter() - t0
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.runs):  # interleaved, so every config sees the same machine load
        for name, run in runners.items():
            speeds[name].append(run()[0])
    med = {name: round(statistics.median(v), 2) for name, v in speeds.items()}
    base = med["hf_fp32"]
    before_eos = {name: _before_eos(ids, eos) for name, ids in texts.items()}
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, dequantised Q4_1, real weights)",
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompt),
        "runs": args.runs,
        "tokens_per_s": med,
        "speedup_vs_hf_fp32": {name: round(v / base, 2) for name, v in med.items()},
        "first_run_s": {name: round(v, 2) for name, v in compile_s.items()},
        # transformers' min_new_tokens masks EOS while llmopt's ignore_eos emits it and goes on,
        # so tokens are compared up to the first EOS
        "greedy_tokens_before_eos_equal_hf_fp32": {
            name: ids == before_eos["hf_fp32"][:len(ids)] for name, ids in before_eos.items()},
        "tokens_before_eos": {name: len(ids) for name, ids in before_eos.items()},
        "all_runs": speeds,
        "first_use_conversion_s": round(conv_s, 2),
        "warm_load_s": round(load_s, 2),  # load_model in a fresh process, after imports
        "torch_import_s": round(import_s, 2),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
