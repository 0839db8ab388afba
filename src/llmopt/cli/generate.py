"""``llmopt generate``: stream a continuation, then a stats line (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys

from llmopt.cli.common import add_model_args, add_sampling_args, sampling_from_args
from llmopt.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)  # validate options before loading anything
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt: pass --prompt TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise UserError("empty prompt")
    if args.system and not args.chat:
        raise UserError("--system needs --chat")

    from llmopt.api import LLM

    llm = LLM(args.model, device=args.device, dtype=args.dtype, attention=args.attention)

    def stream(_: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    out = llm.generate([prompt], params, chat=args.chat, system=args.system,
                       stream=None if args.json else stream)[0]
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
    return 0
