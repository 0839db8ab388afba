"""int4: asymmetric, group-wise (32, 64 or 128 input channels per scale and zero point), round to
nearest. Also the final step of AWQ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llmopt.quant.api import QuantConfig, check_group_size, check_layers_fit, swap_linears
from llmopt.quant.linear import Int4Linear
from llmopt.quant.primitives import group_minmax_params, quantize_groupwise


@dataclass(frozen=True)
class Int4Config(QuantConfig):
    group_size: int = 128
    method: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        check_group_size(self.group_size)


CONFIG = Int4Config


def quantize_weight_rtn(w: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                        bits: int = 4) -> Int4Linear:
    params = group_minmax_params(w, bits, group_size)  # [N, G]
    codes = quantize_groupwise(w, params, bits, group_size)  # [N, K]
    return Int4Linear.from_codes(codes, params.scales, params.zeros, group_size, bias, w.dtype, bits)


def quantize_model(model: nn.Module, config: Int4Config, calibration: torch.Tensor | None,
                   progress: bool) -> None:
    check_layers_fit(model, config, config.group_size)
    swap_linears(model, config,
                 lambda _, lin: quantize_weight_rtn(lin.weight, config.group_size, lin.bias), progress)
