"""Batch decode benchmark: tokens/s, time to first token, achieved GB/s against the roofline."""

from __future__ import annotations

import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmopt.config import ModelConfig
from llmopt.devices import copy_bandwidth, device_name, memory_stats, reset_peak_memory, synchronize
from llmopt.engine.generate import Generator
from llmopt.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    batch_size: int = 1
    prompt_len: int = 5
    new_tokens: int = 200
    runs: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        from llmopt.errors import UserError

        for name in ("batch_size", "prompt_len", "new_tokens", "runs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.runs < 3:
            raise UserError(f"--runs must be >= 3 (the median of at least three), got {self.runs}")


@dataclass
class RunResult:
    ttft_s: float
    decode_tokens_per_s: float  # per sequence
    total_s: float


@dataclass
class BenchResult:
    model: str
    random_weights: bool
    device: str
    dtype: str
    attention: str
    compile: bool
    compile_mode: str | None
    compile_prefill: bool
    fuse_projections: bool
    quant: str | None
    config: dict[str, Any]
    runs: list[RunResult]
    decode_tokens_per_s: float  # median, per sequence
    total_tokens_per_s: float  # median decode tokens/s summed over the batch
    ttft_s: float
    prefill_tokens_per_s: float
    weight_bytes: int
    kv_bytes_per_step: float
    achieved_gb_per_s: float
    copy_gb_per_s: float | None
    roofline_tokens_per_s: float | None
    roofline_fraction: float | None
    memory: dict[str, float]
    load_s: float
    first_run_s: float
    compile_s: float | None
    start_to_first_token_s: float
    start_to_first_run_done_s: float  # load + every compile + one whole generation
    versions: dict[str, str]
    dense_gemv: str = "none"  # which plain linears took llmopt's one-row kernel (models.gemv_linear)
    dense_gemv_modules: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_bytes_read_per_token(model: nn.Module) -> int:
    """Bytes of parameters and buffers a decode step reads: everything but the embedding table
    (one row of it is read), counting a tied head once (it is read as the head)."""
    from llmopt.quant.linear import QuantLinear

    seen: set[int] = set()
    total = 0
    embed = model.model.embed_tokens
    tied = model.config.tie_word_embeddings
    for _, mod in model.named_modules():
        if mod is embed and not tied:
            continue
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        if isinstance(mod, QuantLinear):
            # it knows which of its buffers decode reads (a device repack replaces the codes)
            seen.update(id(t) for _, t in tensors if t is not None)
            total += mod.weight_bytes() + (0 if mod.bias is None else mod.bias.numel() * mod.bias.element_size())
            continue
        for name, t in tensors:
            if t is None or "cache" in name or name.startswith("rope_") or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def kv_bytes_per_step(config: ModelConfig, batch: int, mean_len: float, dtype: torch.dtype) -> float:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * mean_len * elem


def settings_env() -> dict[str, str]:
    """The environment switches that change what runs (kernel choice, tuning), to record with a
    number: ``LLMOPT_*`` and ``TORCHINDUCTOR_*``, less the cache path and the launcher's pid."""
    import os

    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("LLMOPT_", "TORCHINDUCTOR_")) and k not in ("LLMOPT_CACHE", "LLMOPT_LAUNCHER_PID")}


def versions(device: torch.device) -> dict[str, str]:
    from llmopt import __version__

    v = {"llmopt": __version__, "torch": torch.__version__, "python": platform.python_version(),
         "device": device_name(device)}
    if device.type == "cuda":
        v["cuda"] = str(torch.version.cuda)
        try:
            import triton

            v["triton"] = triton.__version__
        except ImportError:
            pass
    return v


def random_prompts(cfg: BenchConfig, vocab_size: int) -> list[list[int]]:
    """``cfg.batch_size`` prompts of ``cfg.prompt_len`` token ids, seeded by ``cfg.seed``."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(3, vocab_size, (cfg.batch_size, cfg.prompt_len), generator=g).tolist()


def run_latency_bench(
    model: nn.Module,
    device: torch.device,
    cfg: BenchConfig,
    *,
    model_name: str,
    random_weights: bool,
    attention: str,
    compile: bool,
    compile_mode: str,
    quant: str | None,
    load_s: float,
    t_process_start: float,
    profile_dir: Path | None = None,
    compile_prefill: bool = False,
    fuse_projections: bool | None = None,
    dense_gemv: str | None = None,
) -> BenchResult:
    """Under tensor parallelism ``model`` is one rank's shard, and the roofline is that rank's:
    its weights and the KV heads its attention holds."""
    config: ModelConfig = model.config
    dtype = next(model.parameters()).dtype
    max_seq = cfg.prompt_len + cfg.new_tokens
    gen = Generator(model, None, device, compile=compile, compile_mode=compile_mode,
                    max_seq_len=-(-max_seq // 256) * 256, compile_prefill=compile_prefill,
                    fuse_projections=fuse_projections, dense_gemv=dense_gemv)
    prompts = random_prompts(cfg, config.vocab_size)
    params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=0, ignore_eos=True)
    reset_peak_memory(device)

    def one_run() -> RunResult:
        synchronize(device)
        t0 = time.perf_counter()
        out = gen.generate(prompts, params)
        total = time.perf_counter() - t0
        st = out[0].stats
        assert st is not None and all(len(o.token_ids) == cfg.new_tokens for o in out)
        return RunResult(st.time_to_first_token_s, st.decode_tokens_per_s, total)

    t0 = time.perf_counter()
    first = one_run()
    first_run_s = time.perf_counter() - t0
    start_to_first_token = (t0 - t_process_start) + first.ttft_s
    for _ in range(cfg.warmup):
        one_run()
    runs = [one_run() for _ in range(cfg.runs)]
    if profile_dir is not None:
        profile_run(one_run, profile_dir, device)
    med = statistics.median
    dec = med(r.decode_tokens_per_s for r in runs)
    ttft = med(r.ttft_s for r in runs)
    compile_s = max(first_run_s - med(r.total_s for r in runs), 0.0) if compile else None
    wbytes = weight_bytes_read_per_token(model)
    kv = kv_bytes_per_step(config, cfg.batch_size, cfg.prompt_len + cfg.new_tokens / 2, dtype)
    kv *= model.model.layers[0].self_attn.num_kv_heads / config.num_kv_heads  # this device's share
    achieved = (wbytes + kv) * dec  # one decode step serves the whole batch
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    roof_tps = copy_bw / (wbytes + kv) if copy_bw else None
    return BenchResult(
        model=model_name, random_weights=random_weights, device=device_name(device),
        dtype=str(dtype).replace("torch.", ""), attention=attention, compile=compile,
        # on CPU a whole-model compile has no mode: compile_fn freezes the weights instead
        compile_mode=(None if not compile else "cpu-freezing"
                      if device.type == "cpu" and gen.compile_mode != "regional" else gen.compile_mode),
        compile_prefill=compile_prefill,
        fuse_projections=gen.fused_projections, quant=quant, config=asdict(cfg), runs=runs,
        decode_tokens_per_s=dec, total_tokens_per_s=dec * cfg.batch_size, ttft_s=ttft,
        prefill_tokens_per_s=cfg.batch_size * cfg.prompt_len / ttft,
        weight_bytes=wbytes, kv_bytes_per_step=kv, achieved_gb_per_s=achieved / 1e9,
        copy_gb_per_s=copy_bw / 1e9 if copy_bw else None, roofline_tokens_per_s=roof_tps,
        roofline_fraction=dec / roof_tps if roof_tps else None, memory=memory_stats(device),
        load_s=load_s, first_run_s=first_run_s, compile_s=compile_s,
        start_to_first_token_s=start_to_first_token,
        start_to_first_run_done_s=(t0 - t_process_start) + first_run_s, versions=versions(device),
        dense_gemv=gen.dense_gemv, dense_gemv_modules=gen.dense_gemv_modules,
    )


def profile_run(fn: Any, out_dir: Path, device: torch.device, trace: bool = True) -> None:
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    if trace:
        prof.export_chrome_trace(str(out_dir / "trace.json"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    (out_dir / "top_kernels.txt").write_text(table)


def format_table(r: BenchResult) -> str:
    rows = [
        ("model", f"{r.model}{' (random weights)' if r.random_weights else ''}"),
        ("device / dtype", f"{r.device} / {r.dtype}"),
        ("attention / compile", f"{r.attention} / {r.compile_mode if r.compile else 'eager'}"),
        ("quantisation", (r.quant or "none") + (", q/k/v and gate/up fused" if r.fuse_projections else "")),
        *([("one-row kernel", f"{r.dense_gemv_modules} linears ({ {'out': 'o_proj, down_proj', 'all': 'all'}.get(r.dense_gemv, 'swapped before') })")]
          if r.dense_gemv_modules else []),
        *([("PDL launches", ", ".join(f"{who}'s kernels {'on' if on else 'off'}" for who, on in r.extra["pdl"].items()))]
          if "pdl" in r.extra else []),
        *([("tensor parallel", f"{r.extra['tp']} ranks, {r.extra['allreduce']} all-reduce "
                               "(bandwidth and roofline per rank)")] if "tp" in r.extra else []),
        ("batch x prompt + new", f"{r.config['batch_size']} x {r.config['prompt_len']} + {r.config['new_tokens']}"),
        ("decode tok/s (per seq)", f"{r.decode_tokens_per_s:.1f}"),
        ("decode tok/s (batch)", f"{r.total_tokens_per_s:.1f}"),
        ("time to first token", f"{r.ttft_s * 1000:.1f} ms"),
        ("prefill tok/s", f"{r.prefill_tokens_per_s:.0f}"),
        ("bytes read per step", f"{(r.weight_bytes + r.kv_bytes_per_step) / 1e9:.3f} GB"),
        ("achieved bandwidth", f"{r.achieved_gb_per_s:.1f} GB/s"),
    ]
    if r.copy_gb_per_s:
        rows += [("copy bandwidth", f"{r.copy_gb_per_s:.0f} GB/s"),
                 ("roofline tok/s", f"{r.roofline_tokens_per_s:.1f}"),
                 ("% of roofline", f"{100 * (r.roofline_fraction or 0):.1f}%")]
    if r.memory:
        rows.append(("peak memory", f"{r.memory['peak_allocated_gb']:.2f} GB"))
    rows += [("load", f"{r.load_s:.1f} s"), ("start to first token", f"{r.start_to_first_token_s:.1f} s"),
             ("start to first run done", f"{r.start_to_first_run_done_s:.1f} s")]
    if r.compile_s is not None:
        rows.append(("compile (first run - median)", f"{r.compile_s:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
