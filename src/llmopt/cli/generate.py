"""``llmopt generate``: stream a continuation, then a stats line (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys

from llmopt.cli.common import (
    add_model_args,
    add_sampling_args,
    add_speculative_args,
    sampling_from_args,
)
from llmopt.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile: one CUDA graph on GPU, frozen "
                        "prepacked weights on CPU); a short warm-up run compiles first, so the "
                        "stats line shows compiled speed")
    p.add_argument("--compile-mode", default="auto",
                   help="auto (default: regional on one GPU, reduce-overhead on CPU and under "
                        "--tp), regional (one layer compiled and shared by all, the step captured "
                        "as one CUDA graph: a short cold compile), reduce-overhead (the whole step "
                        "compiled, one CUDA graph; frozen weights on CPU), max-autotune, "
                        "max-autotune-no-cudagraphs, default")
    add_speculative_args(p)


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)  # validate options before loading anything
    from llmopt.parallel import maybe_launch, rank_index

    prompt = args.prompt
    if prompt is None and rank_index() == 0:  # under --tp only rank 0 reads stdin, then shares it
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt: pass --prompt TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    if prompt == "":
        raise UserError("empty prompt")
    if args.system and not args.chat:
        raise UserError("--system needs --chat")
    if args.draft:
        from llmopt.speculative import SpeculativeConfig, parse_draft_spec

        draft_spec = parse_draft_spec(args.draft)
        spec_config = SpeculativeConfig(k=args.speculate_k, adaptive=not args.fixed_k,
                                        compare_plain=args.speculate_compare,
                                        compile=args.compile, compile_mode=args.compile_mode,
                                        # ranks timing their own steps could choose different k
                                        measured_costs=args.tp == 1)

    rc = maybe_launch(args, stdin_data=prompt if args.prompt is None else None)
    if rc is not None:  # this process started the --tp ranks; they have finished
        return rc

    from llmopt.api import LLM

    if args.tp > 1:  # this process is one rank of a tensor-parallel group
        from llmopt.parallel import ShardedLLM

        llm = ShardedLLM(args.model, tp=args.tp, device=args.device, dtype=args.dtype,
                         attention=args.attention, allreduce=args.tp_allreduce, quant=args.quant,
                         compile=args.compile, compile_mode=args.compile_mode)
        prompt = llm.broadcast(prompt)
        is_main = llm.is_main
    else:
        llm = LLM(args.model, device=args.device, dtype=args.dtype, attention=args.attention,
                  quant=args.quant, compile=args.compile, compile_mode=args.compile_mode)
        is_main = True
    if args.draft:
        from llmopt.speculative import SpeculativeGenerator, build_drafter

        drafter = build_drafter(draft_spec, llm.model, llm.tokenizer)
        # compared against the generator it replaces: the same model, compiled the same way
        llm.generator = SpeculativeGenerator(llm.model, llm.tokenizer, llm.device, drafter, spec_config,
                                             plain=llm.generator)

    if args.compile:
        # Compile on a short warm-up with the real run's cache size, so the streamed run and its
        # stats are the compiled speed (gpt-fast warms up too). On GPU the inductor cache shortens
        # it in later processes; on CPU, freezing bypasses that cache (torch 2.13), so each
        # process compiles (~35 s, 2 cores).
        import time

        if is_main:
            print("compiling the decode step on a short warm-up run...",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        llm.warm_up(prompt, params.max_new_tokens, chat=args.chat, system=args.system)
        if is_main:
            print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def stream(_: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    out = llm.generate([prompt], params, chat=args.chat, system=args.system,
                       stream=None if args.json or not is_main else stream)[0]
    if not is_main:
        return 0  # only rank 0 prints
    stats = out.stats
    assert stats is not None
    if args.json:
        obj = {
            "model": args.model,
            "text": out.text,
            "token_ids": out.token_ids,
            "prompt_token_ids": out.prompt_token_ids,
            "finish_reason": out.finish_reason,
            "stats": stats.as_dict(),
        }
        if "speculative" in out.extra:
            obj["speculative"] = out.extra["speculative"]
        print(json.dumps(obj))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(
            f"[prompt tokens {stats.prompt_tokens} | new tokens {stats.new_tokens} | "
            f"time to first token {stats.time_to_first_token_s * 1000:.1f} ms | "
            f"{stats.decode_tokens_per_s:.1f} tok/s | finish {out.finish_reason}]",
            file=sys.stderr,
        )
        spec = out.extra.get("speculative")
        if isinstance(spec, dict):
            speedup = f" | speedup {spec['speedup']:.2f}x" if spec.get("speedup") else ""
            print(f"[draft {spec['drafter']} | accepted {spec['acceptance_rate']:.0%} of drafts | "
                  f"{spec['mean_tokens_per_step']:.2f} tokens per step{speedup}]", file=sys.stderr)
    return 0
