"""Load-time swap of plain half-precision ``nn.Linear`` modules for ``GemvLinear``: on CUDA a
single input row (batch-1 decode) goes to llmopt's one-row Triton kernel
(``triton_wo.gemv`` with ``FMT_DENSE``: each program streams whole weight rows and stores its
outputs, one kernel per matmul); any other input goes to ``F.linear`` as before.

Alone on an H200, that kernel ran the 4096 x 4096 layer at 98% of the copy bandwidth against
cuBLAS's 80% (``bench/results/decode/h200_s6a_wo_kernels.json``). Quantised, fused or sharded
modules are not plain ``nn.Linear`` and are left alone; swapped modules that read the same input
can be fused afterwards (``models.fusion``).

Swapping every linear (``which="all"``, ``--dense-gemv all``) lost: the compiled step's q/k/v and
gate/up kernels, with the RMSNorm folded in, already ran near the copy bandwidth in the TP=1
profile (``bench/results/tp/h200x2_s13a/profile``, 7B: gate/up 45.9 us per layer for 180 MB,
3.9 TB/s), while its o_proj (11.9 us, 33.5 MB) and down_proj (32.9 us, 90 MB) ran at 2.7-2.8
TB/s. ``which="out"`` swaps only those two, and won: 7B, batch 1, one H200, four compiles each
(``bench/results/decode/h200_s14*``), 254.4, 241.7, 254.4, 254.4 tok/s against 242.2, 242.0,
241.1, 235.7 without the swap; at a 4,096-token context 223.9 and 224.0 against 215.8 and 210.3.
On Llama-3-8B's shape it did not gain: 210.1 and 226.8 against 226.0 and 227.8 (h200_s14e/f).
So ``gemv_by_default`` makes it what a compiled bf16 model on one Hopper GPU gets, as
``engine.generate.Generator`` applies it (``--dense-gemv none`` turns it off).

LLMOPT_DENSE_GEMV, read and checked at import: what a ``Generator`` not told otherwise swaps
(``llmopt generate``, the ``LLM`` API, ``bench`` without ``--dense-gemv``): "auto" (default)
``gemv_by_default``, or "none", "out", "all" for every model, compiled or not.

LLMOPT_DENSE_ONE_ROW, read and checked at import: which one-row kernel a swapped module's row
takes. "deferred" (default; the measurement above) the deferred-sum kernel the quantised formats
use at batch 1 (``triton_wo._rowmajor_gemv1``, which loads each next tile before it sums the last
one, LLMOPT_GEMV_PREFETCH, and can be a programmatic dependent launch, LLMOPT_KERNEL_PDL); "reduce"
the few-row kernel, which sums each tile as it goes (seventh session, every linear swapped:
221.3 tok/s against 224.0 without the swap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.errors import UserError, env_choice

DENSE_ONE_ROW = env_choice("LLMOPT_DENSE_ONE_ROW", "deferred", ("deferred", "reduce"))


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
CHOICES = (*SWAPS, "none")  # --dense-gemv; unset: LLMOPT_DENSE_GEMV, whose "auto" is gemv_by_default
DENSE_GEMV = env_choice("LLMOPT_DENSE_GEMV", "auto", ("auto", *CHOICES))
# The output projections: their inputs are the attention's output and silu(gate) * up, never a
# normalised hidden state, so the compiler fuses no norm into them (it does into q/k/v and
# gate/up), and they are the matmuls it ran furthest from the copy bandwidth.
OUT_PROJECTIONS = ("o_proj", "down_proj")


def use_gemv_linears(model: nn.Module, which: str = "all") -> int:
    """Turn in place plain ``nn.Linear`` modules whose weight is bf16 or fp16 into ``GemvLinear``:
    every one (the head included) with ``which="all"``, with ``"out"`` only those named in
    ``OUT_PROJECTIONS``. Each module keeps its identity and state (only its class changes, and
    ``GemvLinear`` adds no state): parameters, tied weights, hooks (a tensor-parallel row
    shard's all-reduce, ``parallel.sharding``) and feature counts stay. Returns how many."""
    if which not in SWAPS:
        raise ValueError(f"which must be one of {SWAPS}, not {which!r}")
    swaps = {id(child): child for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.dtype in (torch.bfloat16, torch.float16)
             and (which == "all" or name in OUT_PROJECTIONS)}
    for child in swaps.values():
        child.__class__ = GemvLinear
    return len(swaps)


def gemv_by_default(model: nn.Module, device: torch.device) -> str:
    """What an unset ``--dense-gemv`` means for a compiled model: ``"out"`` on one NVIDIA GPU of
    compute capability 9.0 or later (``engine.compile.one_hopper_gpu``, where it was measured:
    see the module's docstring) when each layer's o_proj is still a plain bf16 or fp16
    ``nn.Linear``, else ``"none"``: CPU, quantised models, older or non-NVIDIA GPUs, and
    tensor-parallel ranks (not measured there; an explicit ``"out"`` works, the row shards
    keeping their all-reduce)."""
    from llmopt.engine.compile import one_hopper_gpu

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or not one_hopper_gpu(device):
        return "none"
    o = getattr(layers[0].self_attn, "o_proj", None)
    plain = type(o) in (nn.Linear, GemvLinear) and o.weight.dtype in (torch.bfloat16, torch.float16)
    return "out" if plain else "none"


def dense_gemv_choice(dense_gemv: str | None, model: nn.Module, device: torch.device, compiled: bool) -> str:
    """The swap a ``Generator`` makes: ``dense_gemv`` when given (one of ``CHOICES``), else
    LLMOPT_DENSE_GEMV, whose "auto" is ``gemv_by_default`` for a compiled model and "none" for
    an eager one. Anything else is a ``UserError``."""
    if dense_gemv is None:
        dense_gemv = DENSE_GEMV if DENSE_GEMV != "auto" else gemv_by_default(model, device) if compiled else "none"
    if dense_gemv not in CHOICES:
        raise UserError(f"dense_gemv must be one of {', '.join(CHOICES)}, not {dense_gemv!r}")
    return dense_gemv
