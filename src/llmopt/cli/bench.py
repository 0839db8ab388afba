"""``llmopt bench``: decode speed against the memory-bandwidth roofline."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmopt.cli.common import add_model_args, add_speculative_args

if TYPE_CHECKING:
    from llmopt.bench.latency import BenchConfig

T_PROCESS_START = time.perf_counter()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (>= 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after the first")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graph)")
    p.add_argument("--compile-mode", default="auto",
                   help="auto (default: regional on one GPU, reduce-overhead elsewhere), regional "
                        "(per-layer compile + one captured CUDA graph), reduce-overhead, "
                        "max-autotune, max-autotune-no-cudagraphs, default")
    p.add_argument("--compile-prefill", action="store_true",
                   help="also compile prefill (dynamic shapes): lower time to first token, longer compile")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse q/k/v and gate/up matmuls into one each (default: on for weight-only "
                        "quantised models compiled on one GPU, where one launch instead of three or two "
                        "measured faster in every format; off for bf16, measured slower on an H200)")
    p.add_argument("--dense-gemv", nargs="?", const="all", default=None, choices=("all", "out", "none"),
                   help="with --compile, bf16/fp16 matmuls at batch 1 through llmopt's one-row Triton "
                        "kernel instead of the compiler's: 'out', each layer's o_proj and down_proj "
                        "(the default on one Hopper GPU, measured faster), 'all' (a bare --dense-gemv), "
                        "or 'none'")
    add_speculative_args(p, compare=False)
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="with --draft: the prompt is this text file (a real model's tokens; it then "
                        "stops at end-of-sequence like generate), instead of --prompt-len random tokens")
    p.add_argument("--chat", action="store_true", help="with --prompt-file: as a chat turn (the chat template)")
    p.add_argument("--json", dest="json_path", default=None, help="write the result to this file")
    p.add_argument("--profile", default=None, help="write a torch.profiler trace to this directory")


def run(args: argparse.Namespace) -> int:
    from llmopt.bench.latency import BenchConfig, format_table, run_latency_bench
    from llmopt.loading.loader import load_model

    cfg = BenchConfig(batch_size=args.batch_size, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup)
    from llmopt.errors import UserError
    from llmopt.parallel import maybe_launch

    tp_n = getattr(args, "tp", 1)
    if args.draft is None and (args.prompt_file or args.chat):
        raise UserError("--prompt-file and --chat need --draft (decode speed does not depend on the prompt's text)")
    if args.chat and not args.prompt_file:
        raise UserError("--chat needs --prompt-file")
    if args.draft is not None:
        for bad, name in ((tp_n > 1, "--tp"), (args.profile, "--profile"), (args.compile_prefill, "--compile-prefill")):
            if bad:
                raise UserError(f"{name} does not apply with --draft")
        text = None
        if args.prompt_file:
            try:
                text = Path(args.prompt_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
        return _run_draft(args, cfg, text)
    rc = maybe_launch(args)
    if rc is not None:  # this process started the --tp ranks; they have finished
        return rc
    quant = getattr(args, "quant", None)
    tp = None
    if tp_n > 1:  # one rank of the group: every rank runs the same bench, rank 0 reports
        from llmopt.parallel.loading import load_for_rank
        from llmopt.parallel.process_group import init_tp

        tp = init_tp(tp_n, args.device, args.tp_allreduce)
        lm = load_for_rank(args.model, tp, dtype=args.dtype, quant=quant)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype, quant=quant)
    needed = cfg.prompt_len + cfg.new_tokens
    if needed > lm.config.max_position_embeddings:
        raise UserError(f"prompt-len + new-tokens = {needed} exceeds the model's context "
                        f"({lm.config.max_position_embeddings})")
    from llmopt.attention.base import resolve_backend_name

    attention = resolve_backend_name(args.attention, lm.device)
    lm.model.set_attention_backend(attention)
    result = run_latency_bench(
        lm.model, lm.device, cfg, model_name=args.model, random_weights=lm.random_weights,
        attention=attention, compile=args.compile, compile_mode=args.compile_mode,
        quant=getattr(args, "quant", None), load_s=lm.load_seconds, t_process_start=T_PROCESS_START,
        profile_dir=Path(args.profile) if args.profile else None, compile_prefill=args.compile_prefill,
        fuse_projections=args.fuse_projections, dense_gemv=args.dense_gemv,
    )
    if tp is not None:
        result.extra.update(tp=tp.world_size, per_rank_roofline=True,
                            allreduce=tp.backend if tp.allreduce == "nccl" else tp.allreduce)
        if not tp.is_main:
            return 0  # only rank 0 reports
    settings = None
    if args.compile and lm.device.type == "cuda":
        from llmopt.engine.compile import inductor_settings

        settings = inductor_settings(lm.model)
        result.extra["pdl"] = {"inductor": settings["pdl"], "llmopt": settings["kernel_pdl"]}
    print(format_table(result))
    if args.json_path:
        extra: dict[str, Any] = {}
        if settings is not None:
            extra["inductor_settings"] = settings
        if lm.quant_config is not None:
            extra["quant_config"] = lm.quant_config
        if args.quant:  # the weight-only kernel path, whether chosen or the default of the day
            from llmopt.quant.kernels import GEMV_STAGES, gpu_kernel_choice

            extra["wo_kernel"] = gpu_kernel_choice()
            extra["gemv_stages"] = dict(GEMV_STAGES)  # resolved: "auto" differs per kernel
        _write_json(args.json_path, result.as_dict(), extra)
    return 0


def _write_json(path: str, out: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """``out`` with the command line and the switches that change what runs (kernel choice,
    tuning: they belong with the number), then ``extra``, as JSON at ``path``."""
    import sys

    from llmopt.bench.latency import settings_env

    out = {**out, "command": "llmopt " + " ".join(sys.argv[1:]), "env": settings_env(), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))


def _run_draft(args: argparse.Namespace, cfg: BenchConfig, text: str | None) -> int:
    """``bench --draft``: speculative against plain decoding (llmopt.bench.speculative)."""
    from llmopt.attention.base import resolve_backend_name
    from llmopt.bench.speculative import bench_prompt, format_speculative, run_speculative_bench
    from llmopt.loading.loader import load_model
    from llmopt.speculative import parse_draft_spec

    parse_draft_spec(args.draft)  # a bad spec fails before the model loads
    lm = load_model(args.model, device=args.device, dtype=args.dtype, quant=args.quant)
    lm.model.set_attention_backend(resolve_backend_name(args.attention, lm.device))
    prompt = bench_prompt(cfg, lm.config.vocab_size, lm.tokenizer, text, args.chat)
    result = {"model": args.model, "random_weights": lm.random_weights, "quant": args.quant,
              "prompt_file": args.prompt_file, "chat": args.chat}
    result.update(run_speculative_bench(
        lm.model, lm.tokenizer, lm.device, cfg, prompt, draft=args.draft, k=args.speculate_k,
        adaptive=not args.fixed_k, compile=args.compile, compile_mode=args.compile_mode,
        stop_at_eos=text is not None, fuse_projections=args.fuse_projections, dense_gemv=args.dense_gemv))
    print(format_speculative(result))
    if args.json_path:
        _write_json(args.json_path, result, {"quant_config": lm.quant_config} if lm.quant_config else None)
    return 0
