"""``llmopt convert FILE.gguf --out DIR``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmopt.cli.common import progress_enabled
from llmopt.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="the .gguf file to convert")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    from llmopt.loading.convert import convert_gguf

    src = Path(args.gguf)
    if not src.is_file():
        raise UserError(f"{src} not found")
    t0 = time.perf_counter()
    out = convert_gguf(src, Path(args.out), progress=progress_enabled(), overwrite=args.overwrite)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0
