"""Load-time fusion of projections that read the same input: q/k/v into one matmul and
gate/up into another. At batch 1 every matmul is a separate weight-streaming kernel with its own
ramp-up and tail, so fewer, larger ones get closer to the memory bandwidth.

Plain ``nn.Linear`` modules (and ``--dense-gemv``'s ``GemvLinear``) are fused by concatenating
weights, into a module of their class; weight-only quantised ones of one format and settings by
concatenating their codes, scales and zeros (``QuantLinear.cat_outputs``), which runs the same
kernels on the same codes, one launch instead of three or two. Sharded modules, and quantised
ones that cannot be joined, are left as they are. The fused model keeps its config; checkpoints
are always written unfused.
"""

from __future__ import annotations

import torch
from torch import nn


def _cat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """Parts of one class (``nn.Linear``, or ``--dense-gemv``'s subclass) joined into that class."""
    w = torch.cat([p.weight for p in parts], dim=0)  # [sum(out), in]
    has_bias = parts[0].bias is not None
    fused = type(parts[0])(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def _cat(parts: list[nn.Module | None]) -> nn.Module | None:
    """One module for ``parts`` (same input, outputs side by side), or None if they cannot be."""
    from llmopt.models.gemv_linear import GemvLinear
    from llmopt.quant.linear import QuantLinear

    if all(type(m) is nn.Linear for m in parts) or all(type(m) is GemvLinear for m in parts):
        return _cat_linear(parts)  # type: ignore[arg-type]
    if all(isinstance(m, QuantLinear) for m in parts):
        return QuantLinear.cat_outputs(parts)  # type: ignore[arg-type]
    return None


def fuse_projections(model: nn.Module) -> int:
    """Fuse in place; returns how many groups were fused."""
    n = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            fused = _cat([getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")])
            if fused is not None:
                attn.qkv_proj = fused
                del attn.q_proj, attn.k_proj, attn.v_proj
                n += 1
        if mlp.gate_up_proj is None:
            fused = _cat([getattr(mlp, name, None) for name in ("gate_proj", "up_proj")])
            if fused is not None:
                mlp.gate_up_proj = fused
                del mlp.gate_proj, mlp.up_proj
                n += 1
    return n


def fuse_by_default(model: nn.Module, device: torch.device) -> bool:
    """What ``--fuse-projections`` unset means for a compiled model: fuse on a GPU when the
    projections are weight-only quantised, where one launch instead of three or two measured
    faster in every format on an H200 (7B, batch 1: int8 279.8 -> 318.8 tok/s, fp8 336.2 fused,
    int4-g128 357.9 against 337.4, nf4 256.1 -> 291.3; ``bench/results/decode/h200_s11*``); keep
    bf16 unfused (216.6 against 227.9 tok/s: inductor then lowers the wider matmuls to its own
    reductions)."""
    from llmopt.engine.compile import _sharded
    from llmopt.quant.linear import QuantLinear

    layers = getattr(getattr(model, "model", None), "layers", None)
    if device.type != "cuda" or not layers or _sharded():  # measured on one GPU only
        return False
    attn = layers[0].self_attn
    q = attn.qkv_proj if attn.qkv_proj is not None else getattr(attn, "q_proj", None)
    return isinstance(q, QuantLinear)
