"""fp8: e4m3 weights with one float scale per output channel. On CPU (no FP8 matmul) the weight
is expanded to the compute dtype, which emulates the format's rounding exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llmopt.errors import UserError
from llmopt.quant.api import QuantConfig, swap_linears
from llmopt.quant.linear import FP8Linear
from llmopt.quant.primitives import quantize_fp8_per_channel

FP8_MODES = ("dequant", "scaled_mm")


@dataclass(frozen=True)
class FP8Config(QuantConfig):
    mode: str = "dequant"
    method: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        if self.mode not in FP8_MODES:
            raise UserError(f"fp8 mode must be one of {', '.join(FP8_MODES)}, got {self.mode!r}")


CONFIG = FP8Config


def quantize_linear(lin: nn.Linear, config: FP8Config) -> FP8Linear:
    w = lin.weight
    q = quantize_fp8_per_channel(w)
    m = FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, config.mode, w.device, w.dtype)
    m.qweight = q.qweight
    # Scales in the compute dtype, as for every format (loaders cast float tensors to it);
    # the scaled_mm path converts them to the float32 it needs.
    m.scales = q.scales.to(w.dtype)
    m._set_bias(lin.bias)
    return m


def quantize_model(model: nn.Module, config: FP8Config, calibration: torch.Tensor | None,
                   progress: bool) -> None:
    swap_linears(model, config, lambda _, lin: quantize_linear(lin, config), progress)
