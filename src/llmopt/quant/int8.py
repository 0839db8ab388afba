"""int8, round to nearest: symmetric with one scale per output channel (``int8``), or asymmetric
with a scale and a zero point per group of ``group_size`` inputs (``int8-g32``, ``int8-g128``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llmopt.quant.api import QuantConfig, check_group_size, check_layers_fit, swap_linears
from llmopt.quant.linear import Int8Linear
from llmopt.quant.primitives import (
    group_minmax_params,
    quantize_groupwise,
    quantize_int8_per_channel,
)


@dataclass(frozen=True)
class Int8Config(QuantConfig):
    method: ClassVar[str] = "int8"
    group_size: int = 0  # 0: one scale per output channel

    def __post_init__(self) -> None:
        if self.group_size:
            check_group_size(self.group_size)


CONFIG = Int8Config


def quantize_linear(lin: nn.Linear, group_size: int = 0) -> Int8Linear:
    w = lin.weight
    if not group_size:
        q = quantize_int8_per_channel(w)
        return Int8Linear.per_channel(q.qweight, q.scales, lin.bias, w.dtype)
    m = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, w.device, w.dtype,
                   group_size=group_size)
    params = group_minmax_params(w, 8, group_size)  # [N, G], zeros in [0, 255]
    codes = quantize_groupwise(w, params, 8, group_size)  # [N, K] uint8
    # stored signed: q - 128 against zero - 128 gives the same differences
    m.qweight = (codes.to(torch.int16) - 128).to(torch.int8)
    m.scales = params.scales.t().contiguous().to(w.dtype)
    m.zeros = (params.zeros - 128).t().contiguous().to(w.dtype)
    m._set_bias(lin.bias)
    return m


def quantize_model(model: nn.Module, config: Int8Config, calibration: torch.Tensor | None,
                   progress: bool) -> None:
    if config.group_size:
        check_layers_fit(model, config, config.group_size, multiple=1)
    swap_linears(model, config, lambda _, lin: quantize_linear(lin, config.group_size), progress)
