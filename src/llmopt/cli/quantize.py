"""``llmopt quantize``: write a quantised checkpoint (safetensors + quantization_config)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from llmopt.cli.common import add_model_args, progress_enabled
from llmopt.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmopt.quant.api import known_methods

    add_model_args(p)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(known_methods())}")
    p.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale (int4/gptq/awq, default 128, 8-bit gptq 0 = per output channel; "
                        "nf4 block, default 64)")
    p.add_argument("--bits", type=int, default=None,
                   help="gptq only: 4 (default), 3, or 8 (one scale per output channel: int8's format and kernel)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: quantise columns by decreasing Hessian diagonal (default: on for 8 bits, off otherwise)")
    p.add_argument("--sym", action="store_true", help="gptq: symmetric (zero point fixed at the middle)")
    p.add_argument("--damp", type=float, default=None, help="gptq: Hessian damping fraction (default 0.01)")
    p.add_argument("--double-quant", action="store_true", help="nf4: quantise the block scales to int8")
    p.add_argument("--fp8-mode", default=None, help="fp8: dequant (default) or scaled_mm")
    p.add_argument("--skip", action="append", default=None,
                   help="module name pattern to keep in float (repeatable; default lm_head, embed_tokens)")
    p.add_argument("--calib", default=None, help="calibration text for gptq/awq (default: packaged emma.txt)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 8192)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="write the timing (quantisation and saving) and sizes to this file")


def config_from_args(args: argparse.Namespace) -> Any:
    import dataclasses

    from llmopt.quant.api import config_class, make_config

    method = args.method.lower()
    opts: dict[str, Any] = {"skip": tuple(args.skip) if args.skip else None}
    flags = {"bits": args.bits, "act_order": args.act_order, "sym": args.sym or None,
             "damp": args.damp, "double_quant": args.double_quant or None, "mode": args.fp8_mode}
    names = {"bits": "--bits", "act_order": "--act-order", "sym": "--sym", "damp": "--damp",
             "double_quant": "--double-quant", "mode": "--fp8-mode"}
    fields = {f.name for f in dataclasses.fields(config_class(method))}
    for key, value in flags.items():
        if value is None:
            continue
        if key not in fields:
            raise UserError(f"{names[key]} does not apply to method {method!r}")
        opts[key] = value
    if args.group_size is not None:
        if "group_size" in fields:
            opts["group_size"] = args.group_size
        elif "block_size" in fields:
            opts["block_size"] = args.group_size
        else:
            raise UserError(f"--group-size does not apply to method {method!r}")
    return make_config(method, **opts)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # bad method / options fail before anything is loaded
    if getattr(args, "quant", None):
        raise UserError("use --method with quantize, not --quant")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    if config.needs_calibration is False and (args.calib or args.calib_tokens):
        raise UserError(f"--calib/--calib-tokens apply to gptq and awq, not {config.method}")

    from llmopt.loading.loader import load_model
    from llmopt.quant.api import quantize_
    from llmopt.quant.checkpoint import save_quantized

    progress = progress_enabled()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=progress)
    if lm.quant:
        raise UserError(f"{args.model} is already quantised ({lm.quant})")
    calibration = None
    if config.needs_calibration:
        from llmopt.quant.calibration import (
            DEFAULT_CALIB_SEQ_LEN,
            DEFAULT_CALIB_TOKENS,
            load_calibration,
        )

        calibration = load_calibration(lm.tokenizer, args.calib, args.calib_tokens or DEFAULT_CALIB_TOKENS,
                                       args.calib_seq_len or DEFAULT_CALIB_SEQ_LEN, lm.config.vocab_size)
    from llmopt.devices import synchronize

    synchronize(lm.device)
    t0 = time.perf_counter()
    quantize_(lm.model, config, calibration, progress=progress)
    synchronize(lm.device)
    seconds = time.perf_counter() - t0
    t_save = time.perf_counter()
    save_quantized(lm.model, lm.tokenizer, config, out)
    save_s = time.perf_counter() - t_save
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{config.method}: quantised {args.model} in {seconds:.1f} s -> {out} "
          f"({size / 2**20:.1f} MiB of safetensors)")
    if args.json_path:
        import json
        import sys

        import torch

        from llmopt.devices import device_name

        record = {
            "command": "llmopt " + " ".join(sys.argv[1:]), "model": args.model,
            "random_weights": lm.random_weights, "method": config.method, "config": repr(config),
            "device": device_name(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
            "calibration_shape": list(calibration.shape) if calibration is not None else None,
            "load_s": round(lm.load_seconds, 2), "quantize_s": round(seconds, 2),
            "save_s": round(save_s, 2), "safetensors_bytes": size, "torch": torch.__version__,
        }
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0
