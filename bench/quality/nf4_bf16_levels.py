"""`llmopt eval` with NF4's decode levels rounded to bfloat16, as the GPU's default NF4 decode
(LLMOPT_NF4_DECODE=prmt) uses them; the codes are still chosen against the float32 levels.
Shows whether the nf4 quality row (float32 levels, CPU) also holds for the GPU kernel.

Usage: python bench/quality/nf4_bf16_levels.py eval --model smollm2-135m --quant nf4 ... (the
arguments of ``llmopt``)."""

import sys

import torch

import llmopt.quant.linear as linear
from llmopt.cli.main import main
from llmopt.quant.primitives import nf4_codebook


def _bf16_levels() -> torch.Tensor:
    return nf4_codebook().to(torch.bfloat16).float()


linear.nf4_codebook = _bf16_levels  # the modules' decode codebook only, not the quantiser's
sys.exit(main(sys.argv[1:]))
