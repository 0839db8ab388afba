"""Load-time swap of plain half-precision ``nn.Linear`` modules for ``GemvLinear``: on CUDA a
single input row (batch-1 decode) goes to llmopt's one-row Triton kernel
(``triton_wo.gemv`` with ``FMT_DENSE``: each program streams whole weight rows and stores its
outputs, one kernel per matmul); any other input goes to ``F.linear`` as before.

Alone on an H200, that kernel ran the 4096 x 4096 layer at 98% of the copy bandwidth against
cuBLAS's 80% (``bench/results/decode/h200_s6a_wo_kernels.json``). Whether it beats the compiled
decode step's own matmuls is for ``llmopt bench --dense-gemv`` to measure; the swap is opt-in
until then. Quantised, fused or sharded modules are not plain ``nn.Linear`` and are left alone;
swapped modules that read the same input can be fused afterwards (``models.fusion``).

LLMOPT_DENSE_ONE_ROW, read and checked at import: which one-row kernel a swapped module's row
takes. "reduce" (default; the seventh session's measurement, 221.3 tok/s against 224.0 without
the swap) the few-row kernel, which sums each tile as it goes; "deferred" the deferred-sum kernel
the quantised formats use at batch 1 (``triton_wo._rowmajor_gemv1``), which alone can be a
programmatic dependent launch (LLMOPT_KERNEL_PDL=1). 7B, batch 1, fused projections, one H200:
231.6 tok/s, 228.7 with PDL, against 236.1 without the swap (bench/results/decode/h200_s13a).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.errors import env_choice

DENSE_ONE_ROW = env_choice("LLMOPT_DENSE_ONE_ROW", "reduce", ("reduce", "deferred"))


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.numel() == x.shape[-1] and x.dtype == self.weight.dtype
                and x.dtype in (torch.bfloat16, torch.float16)):
            from llmopt.quant.kernels.triton_wo import FMT_DENSE, gemv

            w = self.weight
            y = gemv(x, w, w, w, w, FMT_DENSE, 1 << 30, one_row=DENSE_ONE_ROW)  # scales, zeros, codebook unread
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def use_gemv_linears(model: nn.Module) -> int:
    """Swap in place every plain ``nn.Linear`` (the head included) whose weight is bf16 or fp16;
    parameters are shared, not copied (a tied head stays tied). Returns how many were swapped."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.dtype in (torch.bfloat16, torch.float16):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        new = GemvLinear(child.in_features, child.out_features, bias=child.bias is not None,
                         device="meta")
        new.weight = child.weight
        if child.bias is not None:
            new.bias = child.bias
        setattr(parent, name, new)
    return len(swaps)
