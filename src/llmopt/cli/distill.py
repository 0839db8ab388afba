"""``llmopt distill``: train a small draft model on a teacher's logits; the output loads as --draft."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmopt.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher model (name, directory or .gguf)")
    p.add_argument("--layers", type=int, required=True, help="student decoder layers")
    p.add_argument("--hidden-size", type=int, default=None, help="student width (default: teacher's)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: teacher's head size)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads")
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="MLP width (default: the teacher's ratio)")
    p.add_argument("--corpus", required=True, help="UTF-8 text file to train on")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the next-token loss")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--init", choices=("teacher", "random"), default="teacher",
                   help="start from the teacher's weights where shapes allow (default)")
    p.add_argument("--init-layers", choices=("spread", "first"), default="spread",
                   help="teacher layers that seed the student's (default: evenly spread)")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train embeddings/head copied from the teacher (frozen by default)")
    p.add_argument("--on-policy", type=float, default=0.0,
                   help="fraction of each batch taken from the teacher's own greedy continuations "
                        "of corpus prompts (what a draft must predict) instead of the text itself")
    p.add_argument("--policy-prompts", type=int, default=256,
                   help="continuations generated before training (with --on-policy)")
    p.add_argument("--policy-prompt-len", type=int, default=64)
    p.add_argument("--policy-new-tokens", type=int, default=96)
    p.add_argument("--keep-line-breaks", action="store_true",
                   help="train on the corpus as written (default: hard-wrapped lines inside a "
                        "paragraph are joined, as prompts usually arrive)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="finish within this long, teacher generation included: the step count (and "
                        "the learning-rate schedule) is cut to what fits, timed over the first steps")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="start from a student an earlier run wrote (same shape); the optimizer "
                        "and the learning-rate schedule start afresh")
    p.add_argument("--policy-cache", default=None, metavar="FILE",
                   help="teacher continuations: read from FILE when it exists (same settings), "
                        "else generated and written there")
    p.add_argument("--no-compile-teacher", action="store_true",
                   help="generate the teacher's continuations eagerly (on a GPU they are "
                        "generated with a compiled, graph-captured decode step by default)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (loadable as --draft DIR)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="teacher dtype (the student trains in float32)")


def run(args: argparse.Namespace) -> int:
    from llmopt.speculative.distill import DistillConfig, distill

    cfg = DistillConfig(
        num_layers=args.layers, hidden_size=args.hidden_size, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, kl_weight=args.kl_weight, ce_weight=args.ce_weight,
        temperature=args.distill_temperature, init=args.init, init_layers=args.init_layers,
        freeze_embeddings=not args.train_embeddings, checkpoint_every=args.checkpoint_every,
        seed=args.seed, on_policy=args.on_policy, policy_prompts=args.policy_prompts,
        policy_prompt_len=args.policy_prompt_len, policy_new_tokens=args.policy_new_tokens,
        unwrap_lines=not args.keep_line_breaks, time_limit_s=args.time_limit, resume=args.resume,
        policy_cache=args.policy_cache, compile_teacher=not args.no_compile_teacher,
    )
    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise UserError(f"corpus {corpus} is not a file")
    try:
        text = corpus.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"corpus {corpus} is not UTF-8 text") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")

    from llmopt.cli.common import progress_enabled
    from llmopt.loading.loader import load_model

    teacher = load_model(args.teacher, device=args.device, dtype=args.dtype,
                         progress=progress_enabled())
    if teacher.tokenizer is None:
        raise UserError(f"teacher {args.teacher} has no tokenizer: the student must share one")
    meta = {"teacher": args.teacher, "corpus": str(corpus), "command": "llmopt " + " ".join(sys.argv[1:])}
    summary = distill(teacher.model, teacher.tokenizer, text, cfg, out, teacher.device,
                      progress=progress_enabled(), meta=meta)
    print(json.dumps({k: summary[k] for k in ("student_params", "held_out_before", "held_out_after",
                                              "held_out_policy_after", "train_seconds")}))
    print(f"wrote {out} (use it with: llmopt generate --model {args.teacher} --draft {out})",
          file=sys.stderr)
    return 0
