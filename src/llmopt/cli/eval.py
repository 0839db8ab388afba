"""``llmopt eval``: sliding-window perplexity; with --reference, greedy agreement and KL."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
from pathlib import Path
from typing import Any

from llmopt.cli.common import add_model_args, progress_enabled
from llmopt.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--corpus", default=None, help="text file (default: packaged prideprejudice.txt)")
    p.add_argument("--reference", default=None, metavar="M0",
                   help="reference model: adds greedy top-1 agreement and KL(ref || model)")
    p.add_argument("--reference-dtype", default=None, metavar="DTYPE",
                   help="dtype of the reference (default: --dtype); e.g. float32 to measure what "
                        "bfloat16 costs")
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluate the first N tokens (default 16384)")
    p.add_argument("--window", type=int, default=1024, help="tokens per forward pass (default 1024)")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts (default 512)")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS at the start of each window")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")


def command_string(args: argparse.Namespace) -> str:
    parts = ["llmopt", "eval", "--model", args.model]
    for flag, value in (("--quant", args.quant), ("--corpus", args.corpus), ("--reference", args.reference),
                        ("--reference-dtype", args.reference_dtype), ("--device", args.device),
                        ("--dtype", args.dtype), ("--tp", args.tp if args.tp > 1 else None)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--max-tokens", str(args.max_tokens), "--window", str(args.window), "--stride", str(args.stride)]
    if args.no_bos:
        parts.append("--no-bos")
    if args.json:
        parts += ["--json", args.json]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from llmopt.eval import EvalConfig, default_corpus, evaluate

    config = EvalConfig(window=args.window, stride=args.stride, max_tokens=args.max_tokens, bos=not args.no_bos)
    corpus = Path(args.corpus) if args.corpus else default_corpus()
    try:
        text = corpus.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"corpus file {corpus} not found") from None
    except (IsADirectoryError, PermissionError) as e:
        raise UserError(f"cannot read corpus {corpus}: {e.strerror}") from None
    if not text.strip():
        raise UserError(f"corpus file {corpus} is empty")
    if corpus.name == "emma.txt":
        log.warning("emma.txt is the calibration text; evaluating on it flatters gptq/awq")

    from llmopt.loading.loader import load_model
    from llmopt.parallel import maybe_launch

    rc = maybe_launch(args)
    if rc is not None:  # this process started the --tp ranks; they have finished
        return rc
    progress = progress_enabled()
    is_main = True
    if args.tp > 1:  # one rank: every rank evaluates its shard of the model, rank 0 reports
        from llmopt.parallel.loading import load_for_rank
        from llmopt.parallel.process_group import init_tp

        tp = init_tp(args.tp, args.device, args.tp_allreduce)
        is_main = tp.is_main
        progress = progress and is_main
        lm = load_for_rank(args.model, tp, dtype=args.dtype, quant=args.quant, progress=progress)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=progress, quant=args.quant)
    lm.model.set_attention_backend(args.attention)
    ref = None
    if args.reference:  # whole on every rank (the reference is the small or unquantised side)
        ref = load_model(args.reference, device=lm.device, dtype=args.reference_dtype or args.dtype,
                         progress=progress)
        if ref.config.vocab_size != lm.config.vocab_size:
            raise UserError(f"--reference has vocabulary {ref.config.vocab_size}, the model {lm.config.vocab_size}")
    tokenizer = lm.tokenizer or (ref.tokenizer if ref else None)
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer; give --reference with one to tokenise the corpus")
    ids = tokenizer.encode(text, add_special_tokens=False)
    result = evaluate(lm.model, ids, config, tokenizer.bos_token_id, ref.model if ref else None, progress)

    if not is_main:
        return 0
    line = (f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f}) over {result.tokens_scored} tokens, "
            f"{result.windows} windows, {result.seconds:.1f} s")
    if result.agreement is not None:
        line += f" | top-1 agreement {result.agreement * 100:.2f}% | KL {result.kl:.5f}"
    print(line)
    if args.json:
        import torch

        obj: dict[str, Any] = {
            "command": command_string(args),
            "model": args.model,
            "quant": lm.quant,
            "quant_config": lm.quant_config,
            "reference": args.reference,
            "reference_dtype": str(ref.dtype).replace("torch.", "") if ref else None,
            "corpus": str(args.corpus) if args.corpus else "packaged:prideprejudice.txt",
            "config": {"window": config.window, "stride": config.stride, "max_tokens": config.max_tokens,
                       "bos": config.bos, "bos_token_id": tokenizer.bos_token_id if config.bos else None},
            "result": result.as_dict(),
            "device": str(lm.device),
            "tp": args.tp,
            "dtype": str(lm.dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(obj, indent=2) + "\n")
    return 0
