"""``llmopt bench --draft``: speculative decoding against plain decoding with the same settings.

Batch 1, greedy. Each timed run decodes the prompt plainly, then speculatively, on one KV cache
(interleaved, so both see the same machine); the medians give the speedup. The speculative stats
(acceptance by position, tokens per step, the k chosen) are the last run's: greedy runs repeat.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from llmopt.bench.latency import BenchConfig, random_prompts, versions
from llmopt.devices import device_name, memory_stats, reset_peak_memory
from llmopt.engine.generate import Generator
from llmopt.errors import UserError
from llmopt.loading.tokenizer import Tokenizer
from llmopt.sampling import SamplingParams


def bench_prompt(cfg: BenchConfig, vocab_size: int, tokenizer: Tokenizer | None, text: str | None,
                 chat: bool) -> list[int]:
    """The prompt's token ids: ``text`` tokenized (as a chat turn with ``chat``), else
    the latency bench's seeded random ids (``cfg.batch_size`` is 1 here)."""
    if text is None:
        return random_prompts(cfg, vocab_size)[0]
    if tokenizer is None:
        raise UserError("--prompt-file needs a model with a tokenizer (a random-weight preset has none)")
    if not text.strip():
        raise UserError("--prompt-file is empty")
    return tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)


def run_speculative_bench(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    device: torch.device,
    cfg: BenchConfig,
    prompt: list[int],
    *,
    draft: str,
    k: int,
    adaptive: bool,
    compile: bool,
    compile_mode: str,
    stop_at_eos: bool,
    fuse_projections: bool | None = None,
    dense_gemv: str | None = None,
) -> dict[str, Any]:
    from llmopt.speculative import SpeculativeConfig, SpeculativeGenerator, build_drafter

    if cfg.batch_size != 1:
        raise UserError(f"--draft benchmarks one sequence (speculative decoding runs batch size 1); "
                        f"got --batch-size {cfg.batch_size}")
    drafter = build_drafter(draft, model, tokenizer, progress=False)
    # the plain generator's module swaps (fusion, one-row kernels) are the verify step's too
    plain = Generator(model, tokenizer, device, compile=compile, compile_mode=compile_mode,
                      fuse_projections=fuse_projections, dense_gemv=dense_gemv)
    spec_cfg = SpeculativeConfig(k=k, adaptive=adaptive, compare_plain=True, compile=compile,
                                 compile_mode=compile_mode)
    gen = SpeculativeGenerator(model, tokenizer, device, drafter, spec_cfg, plain=plain)
    params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=0, ignore_eos=not stop_at_eos)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    gen.warm_up([prompt], cfg.new_tokens)  # compiles both (when compiled) at the runs' cache size
    warm_up_s = time.perf_counter() - t0
    runs: list[dict[str, float]] = []
    stats: dict[str, Any] = {}
    same = True
    new_tokens = 0
    for i in range(cfg.warmup + cfg.runs):
        out = gen.generate([prompt], params)[0]  # plain, then speculative
        stats = dict(out.extra["speculative"])  # type: ignore[arg-type]
        same &= bool(stats.pop("same_tokens_as_plain", False))
        new_tokens = len(out.token_ids)
        rates = {key: stats.pop(key) for key in ("plain_decode_tokens_per_s", "speculative_decode_tokens_per_s")}
        stats.pop("speedup")  # the medians' ratio below replaces each run's
        if i >= cfg.warmup:
            runs.append(rates)
    med = statistics.median
    plain_tps = med(r["plain_decode_tokens_per_s"] for r in runs)
    spec_tps = med(r["speculative_decode_tokens_per_s"] for r in runs)
    return {
        "device": device_name(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "compile": compile,
        "compile_mode": gen.compile_mode if compile else None,
        "draft": draft,
        "k": k,
        "adaptive_k": adaptive,
        "batch_size": 1,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "max_new_tokens": cfg.new_tokens,
        "stop_at_eos": stop_at_eos,
        "runs": runs,
        "plain_decode_tokens_per_s": plain_tps,
        "speculative_decode_tokens_per_s": spec_tps,
        "speedup": spec_tps / plain_tps,
        "same_tokens_as_plain": same,  # greedy: speculation must not change a token, in every run
        "speculative": stats,
        "warm_up_s": warm_up_s,
        "memory": memory_stats(device),
        "versions": versions(device),
    }


def format_speculative(r: dict[str, Any]) -> str:
    s = r["speculative"]
    by_pos = ", ".join("-" if a is None else f"{100 * a:.0f}%" for a in s["acceptance_by_position"])
    rows = [
        ("model", r["model"] + (" (random weights)" if r.get("random_weights") else "")),
        ("device / dtype", f"{r['device']} / {r['dtype']}"),
        ("compile", r["compile_mode"] if r["compile"] else "eager"),
        ("draft / k", f"{r['draft']} / {r['k']} ({'adaptive' if r['adaptive_k'] else 'fixed'})"),
        ("prompt + new", f"{r['prompt_tokens']} + {r['new_tokens']}"),
        ("plain decode tok/s", f"{r['plain_decode_tokens_per_s']:.1f}"),
        ("speculative tok/s", f"{r['speculative_decode_tokens_per_s']:.1f}"),
        ("speedup", f"{r['speedup']:.2f}x"),
        ("accepted drafts per step", f"{s['mean_accepted_per_step']:.2f} "
                                     f"({s['mean_tokens_per_step']:.2f} tokens per target step)"),
        ("acceptance by position", by_pos),
        ("same tokens as plain", "yes" if r["same_tokens_as_plain"] else "NO"),
    ]
    if s.get("step_ms_by_drafted"):  # adaptive k's measured step times, by drafted tokens
        rows.append(("ms per step by drafts", ", ".join(
            f"{k}: {ms:.2f}" for k, ms in s["step_ms_by_drafted"].items())))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {v}" for name, v in rows)
