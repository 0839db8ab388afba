"""Load-time swap of plain half-precision ``nn.Linear`` modules for ``GemvLinear``: on CUDA a
single input row (batch-1 decode) goes to llmopt's one-row Triton kernel
(``triton_wo.gemv`` with ``FMT_DENSE``: each program streams whole weight rows and stores its
outputs, one kernel per matmul); any other input goes to ``F.linear`` as before.

Alone on an H200, that kernel ran the 4096 x 4096 layer at 98% of the copy bandwidth against
cuBLAS's 80% (``bench/results/decode/h200_s6a_wo_kernels.json``). Whether it beats the compiled
decode step's own matmuls is for ``llmopt bench --dense-gemv`` to measure; the swap is opt-in
until then. Quantised, fused or sharded modules are not plain ``nn.Linear`` and are left alone;
swapped modules that read the same input can be fused afterwards (``models.fusion``).

Swapping every linear lost (above and below): the compiled step's q/k/v and gate/up kernels,
with the RMSNorm folded in, already ran near the copy bandwidth in the TP=1 profile
(``bench/results/tp/h200x2_s13a/profile``, 7B: gate/up 45.9 us per layer for 180 MB, 3.9 TB/s),
while its o_proj (11.9 us, 33.5 MB) and down_proj (32.9 us, 90 MB) ran at 2.7-2.8 TB/s, where
the one-row kernels alone made 3.3-3.8 TB/s (``h200x2_s8_wo_kernels.json``). ``which="out"``
(``--dense-gemv out``) swaps only those two; not yet measured in the model. (Which kernels run
slow moves between compiles: the seventh session's profile had q/k/v and down at 3.1 TB/s.)

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


# ``use_gemv_linears``' choices: every plain linear, or only each layer's output projections
SWAPS = ("all", "out")
# The output projections: their inputs are the attention's output and silu(gate) * up, never a
# normalised hidden state, so the compiler fuses no norm into them (it does into q/k/v and
# gate/up), and they are the matmuls it ran furthest from the copy bandwidth.
OUT_PROJECTIONS = ("o_proj", "down_proj")


def use_gemv_linears(model: nn.Module, which: str = "all") -> int:
    """Swap in place plain ``nn.Linear`` modules whose weight is bf16 or fp16: every one (the
    head included) with ``which="all"``, with ``"out"`` only those named in ``OUT_PROJECTIONS``.
    Parameters are shared, not copied (a tied head stays tied). Returns how many were swapped."""
    if which not in SWAPS:
        raise ValueError(f"which must be one of {SWAPS}, not {which!r}")
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child) is nn.Linear and child.weight.dtype in (torch.bfloat16, torch.float16)
                    and (which == "all" or name in OUT_PROJECTIONS)):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        new = GemvLinear(child.in_features, child.out_features, bias=child.bias is not None,
                         device="meta")
        new.weight = child.weight
        if child.bias is not None:
            new.bias = child.bias
        setattr(parent, name, new)
    return len(swaps)
