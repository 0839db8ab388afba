"""Kernel profile of the compiled verify step at widths 1 and 5 (and the plain decode step), on
the default model's shape (random weights): which kernels a 5-token step adds.
    python bench/device/verify_widths.py --out DIR"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from llmopt.loading.loader import load_model
from llmopt.speculative import NgramDrafter, SpeculativeConfig, SpeculativeGenerator

p = argparse.ArgumentParser()
p.add_argument("--model", default="preset:smollm2-135m")
p.add_argument("--out", required=True)
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
lm = load_model(args.model, device="auto", dtype="bfloat16", progress=False)
model, dev = lm.model, lm.device
gen = SpeculativeGenerator(model, None, dev, NgramDrafter(), SpeculativeConfig(k=4, compile=True, compile_mode="regional"))
gen.warm_up([[5, 6, 7, 8, 9]], 200)
for width in (1, 5):
    tokens = torch.ones(1, width, dtype=torch.long, device=dev)
    pos = torch.arange(100, 100 + width, device=dev)[None]
    with torch.inference_mode():
        for _ in range(5):
            gen._verify_forward(tokens, pos, 100 + width)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(50):
            gen._verify_forward(tokens, pos, 100 + width)
        ev[1].record()
        torch.cuda.synchronize()
        print(f"width {width}: {ev[0].elapsed_time(ev[1]) / 50:.3f} ms per replay", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                gen._verify_forward(tokens, pos, 100 + width)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=70)
    (out / f"width{width}.txt").write_text(table)
    print(f"=== width {width}\n{table}", flush=True)
sys.exit(0)
