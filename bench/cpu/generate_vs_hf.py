"""CPU decode speed of llmopt against Hugging Face transformers' generate, same weights.

Runs both in one process, alternating, so they see the same machine load. Also times the
default model's first-use conversion (fresh cache) and a warm load.

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
        code2 = ("import time; t=time.perf_counter(); from llmopt.loading.loader import load_model; "
                 "load_model('smollm2-135m', device='cpu', progress=False); print(time.perf_counter()-t)")
        load_s = float(subprocess.run([sys.executable, "-c", code2], env=env, check=True,
                                      capture_output=True, text=True).stdout.strip())

    from transformers import AutoModelForCausalLM

    from llmopt.engine.generate import Generator
    from llmopt.loading.loader import load_model
    from llmopt.loading.resolve import resolve_model
    from llmopt.sampling import SamplingParams

    model_dir = resolve_model("smollm2-135m", progress=False)
    ours = load_model(str(model_dir), device="cpu", dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = ours.tokenizer.encode("The capital of France is")
    gen = Generator(ours.model, ours.tokenizer, torch.device("cpu"))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def run_ours() -> tuple[float, float]:
        t0 = time.perf_counter()
        out = gen.generate([prompt], params)[0]
        total = time.perf_counter() - t0
        assert len(out.token_ids) == args.new_tokens
        return args.new_tokens / total, out.stats.decode_tokens_per_s

    def run_hf() -> float:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
        assert out.shape[1] - len(prompt) == args.new_tokens
        return args.new_tokens / total

    run_ours(), run_hf()  # warm-up
    ours_e2e, ours_dec, hf_e2e = [], [], []
    for _ in range(args.runs):
        a, b = run_ours()
        ours_e2e.append(a)
        ours_dec.append(b)
        hf_e2e.append(run_hf())
    med = statistics.median
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, dequantised Q4_1, real weights)",
        "dtype": "float32",
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompt),
        "runs": args.runs,
        "llmopt_tokens_per_s": round(med(ours_e2e), 2),
        "llmopt_decode_tokens_per_s": round(med(ours_dec), 2),
        "hf_generate_tokens_per_s": round(med(hf_e2e), 2),
        "speedup": round(med(ours_e2e) / med(hf_e2e), 2),
        "all_runs": {"llmopt": ours_e2e, "hf": hf_e2e},
        "first_use_conversion_s": round(conv_s, 2),
        "warm_load_s": round(load_s, 2),
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
