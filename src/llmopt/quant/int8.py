"""int8: symmetric, one scale per output channel, round to nearest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llmopt.quant.api import QuantConfig, swap_linears
from llmopt.quant.linear import Int8Linear
from llmopt.quant.primitives import quantize_int8_per_channel


@dataclass(frozen=True)
class Int8Config(QuantConfig):
    method: ClassVar[str] = "int8"


CONFIG = Int8Config


def quantize_linear(lin: nn.Linear) -> Int8Linear:
    w = lin.weight
    q = quantize_int8_per_channel(w)
    m = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, w.device, w.dtype)
    m.qweight = q.qweight
    m.scales = q.scales.to(w.dtype)
    m._set_bias(lin.bias)
    return m


def quantize_model(model: nn.Module, config: Int8Config, calibration: torch.Tensor | None,
                   progress: bool) -> None:
    swap_linears(model, config, lambda _, lin: quantize_linear(lin), progress)
