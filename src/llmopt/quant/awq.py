"""AWQ (Lin et al., 2023): before round-to-nearest int4, scale up the input channels that carry
large activations so their weights lose less to rounding, and scale the activations down by the
same factor so the float product is unchanged.

Per decoder layer, for each group of linears that read the same input, the per-input-channel
scale is s = mean|x|^alpha (normalised so max * min = 1), with alpha picked from a grid by the
output error of the quantised linears on calibration activations. The inverse scale is FOLDED
into the operation that produces the input, so there is nothing extra at run time and the result
is a plain int4 checkpoint (the Hugging Face AWQ layout has no pre-scale tensor):

- q/k/v_proj:   input_layernorm.weight /= s
- gate/up_proj: post_attention_layernorm.weight /= s
- down_proj:    rows of up_proj /= s  (exact: down reads silu(gate) * up)
- o_proj:       rows of v_proj /= s, only when num_heads == num_kv_heads (with grouped-query
                attention one v channel feeds several heads' o_proj channels, so no single
                scale per o_proj channel can be folded); otherwise o_proj is plain RTN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llmopt.quant.api import QuantConfig, check_group_size, check_layers_fit, set_submodule
from llmopt.quant.calibration import capture_first_layer_inputs, decoder_layers, run_layer
from llmopt.quant.int4 import quantize_weight_rtn
from llmopt.quant.primitives import dequantize_groupwise, group_minmax_params, quantize_groupwise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig(QuantConfig):
    group_size: int = 128
    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    max_loss_tokens: int = 4096  # activation rows used to score each alpha
    calib_batch_size: int = 8
    method: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")


CONFIG = AWQConfig


def fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest int4 and back (float32)."""
    p = group_minmax_params(w, 4, group_size)
    q = quantize_groupwise(w, p, 4, group_size)
    return dequantize_groupwise(q, p.scales, p.zeros, group_size)


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, grid: int) -> torch.Tensor:
    """Best per-input-channel scale s [K] for linears ``weights`` (each [N_i, K]) reading x [T, K]."""
    x = x.float()
    w_all = torch.cat([w.float() for w in weights], dim=0)  # [sum N, K]
    ref = x @ w_all.t()  # [T, sum N]
    x_mean = x.abs().mean(dim=0)  # [K]
    best_loss, best_s = float("inf"), torch.ones_like(x_mean)
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quant(w_all * s[None, :], group_size) / s[None, :]
        loss = (x @ wq.t() - ref).pow(2).mean().item()
        if loss < best_loss:
            best_loss, best_s = loss, s
    return best_s


def quantize_model(model: nn.Module, config: AWQConfig, calibration: torch.Tensor | None,
                   progress: bool) -> None:
    from tqdm import tqdm

    assert calibration is not None
    check_layers_fit(model, config, config.group_size)
    layers = decoder_layers(model)
    inputs = capture_first_layer_inputs(model, calibration, config.calib_batch_size)
    mha = getattr(getattr(model, "config", None), "num_heads", 0) == getattr(
        getattr(model, "config", None), "num_kv_heads", -1)
    for li, layer in enumerate(tqdm(layers, desc=f"awq g{config.group_size}", disable=not progress,
                                    unit="layer")):
        attn, mlp = layer.self_attn, layer.mlp
        feats = _capture_inputs(layer, inputs, {"qkv": attn.q_proj, "o": attn.o_proj,
                                                "gate_up": mlp.gate_proj, "down": mlp.down_proj},
                                config.max_loss_tokens)
        prefix = f"model.layers.{li}."

        def active(*names: str, pfx: str = prefix) -> bool:
            return not any(config.skips(pfx + n) for n in names)

        if active("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            s = search_scale(feats["qkv"], [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                             config.group_size, config.grid)
            _fold(layer.input_layernorm, s, [attn.q_proj, attn.k_proj, attn.v_proj])
        if mha and active("self_attn.o_proj"):
            s = search_scale(feats["o"], [attn.o_proj.weight], config.group_size, config.grid)
            _fold(attn.v_proj, s, [attn.o_proj])
        if active("mlp.gate_proj", "mlp.up_proj"):
            s = search_scale(feats["gate_up"], [mlp.gate_proj.weight, mlp.up_proj.weight],
                             config.group_size, config.grid)
            _fold(layer.post_attention_layernorm, s, [mlp.gate_proj, mlp.up_proj])
        if active("mlp.down_proj"):
            s = search_scale(feats["down"], [mlp.down_proj.weight], config.group_size, config.grid)
            _fold(mlp.up_proj, s, [mlp.down_proj])
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear) and not config.skips(prefix + name):
                set_submodule(layer, name, quantize_weight_rtn(mod.weight, config.group_size, mod.bias))
        inputs = run_layer(layer, inputs)
    log.info("awq: %d layers quantised", len(layers))


def _fold(prev: nn.Module, s: torch.Tensor, linears: list[nn.Linear]) -> None:
    """prev's output channel c /= s[c]; each linear's input column c *= s[c] (float product kept).
    New tensors rather than in-place updates: loaded weights may be read-only memory maps."""
    w = prev.weight
    s = s.to(w.dtype)
    # a norm's weight [K], or a linear's weight [K, in] whose output rows are scaled
    prev.weight = nn.Parameter(w / (s if w.dim() == 1 else s[:, None]), requires_grad=False)
    if getattr(prev, "bias", None) is not None:
        prev.bias = nn.Parameter(prev.bias / s, requires_grad=False)
    for lin in linears:
        lin.weight = nn.Parameter(lin.weight * s[None, :], requires_grad=False)


def _capture_inputs(layer: nn.Module, inputs: object, mods: dict[str, nn.Module],
                    max_rows: int) -> dict[str, torch.Tensor]:
    """Inputs of the given linears over the calibration set (float layer), subsampled to
    ``max_rows`` evenly spaced rows to bound the search's cost."""
    got: dict[str, list[torch.Tensor]] = {k: [] for k in mods}
    handles = [m.register_forward_hook(lambda _m, args, _o, k=k: got[k].append(
        args[0].reshape(-1, args[0].shape[-1]).detach())) for k, m in mods.items()]
    try:
        run_layer(layer, inputs)  # type: ignore[arg-type]
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, parts in got.items():
        x = torch.cat(parts)
        if x.shape[0] > max_rows:
            idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()
            x = x[idx]
        out[k] = x
    return out
