"""Options shared by several subcommands (model, device, dtype, sampling)."""

from __future__ import annotations

import argparse
import sys

from llmopt.loading.resolve import DEFAULT_MODEL
from llmopt.sampling import SamplingParams


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"known name, model directory, .gguf file or preset:NAME (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    p.add_argument("--attention", default="auto",
                   help="attention backend: auto (triton on GPU, sdpa on CPU), sdpa, triton")
    p.add_argument("--quant", default=None, metavar="METHOD",
                   help="quantise on the fly: int8[-gN], int4[-gN], nf4, fp8, gptq[-gN][-w3|-w8], awq[-gN] "
                        "(options as METHOD:key=value,...)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: split the model over N GPUs (or CPU processes); "
                        "starts them itself, or joins ranks started by torchrun (default 1)")
    p.add_argument("--tp-allreduce", default="auto",
                   choices=("auto", "nccl", "symm-one-shot", "symm-two-shot"),
                   help="all-reduce under --tp: auto (symm-one-shot on GPUs, the measured fastest; "
                        "nccl/gloo elsewhere), nccl, or PyTorch symmetric memory (GPU only)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def add_speculative_args(p: argparse.ArgumentParser, compare: bool = True) -> None:
    """``compare``: offer --speculate-compare (bench always compares)."""
    from llmopt.speculative.build import DRAFT_HELP

    p.add_argument("--draft", default=None, help=DRAFT_HELP + ("" if compare else (
        "; bench then times plain and speculative decoding in turn (batch 1, greedy) and "
        "reports the speedup")))
    p.add_argument("--speculate-k", type=int, default=4,
                   help="most tokens drafted per step (default 4; adapts unless --fixed-k)")
    p.add_argument("--fixed-k", action="store_true", help="always draft --speculate-k tokens")
    if compare:
        p.add_argument("--speculate-compare", action="store_true",
                       help="also decode without speculation and report the speedup")


def progress_enabled() -> bool:
    return sys.stderr.isatty()
