"""GPTQ (Frantar et al., 2022): quantise a weight column by column and push each column's rounding
error onto the columns not yet quantised, weighted by the inverse Hessian of the layer's
reconstruction loss, H = 2 X^T X over calibration activations X.

The model is processed one decoder layer at a time: the layer's inputs come from the already
quantised earlier layers, Hessians of all its linears are accumulated with forward hooks during
one pass, the linears are quantised, and the quantised layer is run again to make the next
layer's inputs.

Bits 3 and 4 are group-wise with zero points, held as ``Int4Linear``. Bits 8 is one symmetric
scale per output channel, held as ``Int8Linear``: the ``int8`` scheme's format and kernel, with
GPTQ's rounding in place of round-to-nearest. Per channel, act-order costs nothing at inference
(one scale covers every column, so the codes are stored back in model order), and it is on by
default there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from llmopt.errors import UserError
from llmopt.quant.api import QuantConfig, check_group_size, check_layers_fit, set_submodule
from llmopt.quant.calibration import capture_first_layer_inputs, decoder_layers, run_layer
from llmopt.quant.linear import Int4Linear, Int8Linear
from llmopt.quant.primitives import GroupParams, int8_channel_scales, minmax_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    bits: int = 4
    group_size: int | None = None  # None: 128 for 3 and 4 bits; 8 bits is per channel (0)
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    act_order: bool | None = None  # columns by decreasing Hessian diagonal; None: on for 8 bits
    sym: bool | None = None  # zero point fixed at the middle; None: off, always on for 8 bits
    block_size: int = 128  # columns updated lazily together (speed only, same result)
    calib_batch_size: int = 8
    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise UserError(f"gptq bits must be 3, 4 or 8, got {self.bits}")
        per_channel = self.bits == 8
        group_size = self.group_size
        if group_size is None:
            group_size = 0 if per_channel else 128
        if per_channel:
            if group_size not in (0, -1):
                raise UserError(f"8-bit gptq has one scale per output channel: group size 0 (or -1), "
                                f"got {group_size}")
            if self.sym is False:
                raise UserError("8-bit gptq is symmetric (the int8 format); drop sym=false")
            group_size = 0
        else:
            check_group_size(group_size)
        # resolve the defaults so the config (and what is saved from it) says what was done
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "act_order", per_channel if self.act_order is None else self.act_order)
        object.__setattr__(self, "sym", per_channel or bool(self.sym))
        if not 0 < self.damp < 1:
            raise UserError(f"gptq damp must be in (0, 1), got {self.damp}")


CONFIG = GPTQConfig


class GPTQResult(NamedTuple):
    codes: torch.Tensor  # [N, K] uint8, columns in quantisation order (permuted with act-order);
    #                      8 bits: int8 in [-127, 127], columns in model order
    scales: torch.Tensor  # [N, G] float32 (8 bits: G = 1)
    zeros: torch.Tensor  # [N, G] float32 (8 bits: 0)
    perm: torch.Tensor | None  # [K]: stored column j is model column perm[j] (act-order, 3/4 bits)


def _params(w: torch.Tensor, bits: int, sym: bool) -> GroupParams:
    """Scale/zero for columns ``w`` [N, g] (one group)."""
    wmin, wmax = w.amin(dim=1), w.amax(dim=1)  # [N]
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        qmax = 2**bits - 1
        scales = (2 * amax / qmax).clamp(min=1e-10)
        zeros = torch.full_like(scales, (qmax + 1) / 2)
        return GroupParams(scales, zeros)
    return minmax_params(wmin, wmax, bits)


def gptq_quantize_weight(w: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig) -> GPTQResult:
    """Quantise one weight [N, K] given H [K, K] (float32)."""
    bits, gs = config.bits, config.group_size
    assert gs is not None
    qmin, qmax = (-127, 127) if bits == 8 else (0, 2**bits - 1)
    W = w.float().clone()  # [N, K]
    H = hessian.clone()
    n, k = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # channels never active: any value works, keep H invertible
    W[:, dead] = 0.0
    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += config.damp * torch.mean(torch.diag(H)) * torch.eye(k, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        # Upper Cholesky factor of H^-1: row i holds the update weights for columns > i.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # [K, K]
    except torch.linalg.LinAlgError:
        raise UserError("GPTQ: the Hessian is not positive definite; raise damp or use more calibration data") from None

    Q = torch.zeros_like(W, dtype=torch.int8 if bits == 8 else torch.uint8)
    if gs:
        G = math.ceil(k / gs)
        scales = torch.zeros(n, G, device=W.device)
        zeros = torch.zeros(n, G, device=W.device)
        # Blocks are whole groups so a group's parameters are taken from its updated columns.
        block = max(gs, config.block_size // gs * gs)
    else:  # one symmetric scale per output channel, from the whole row (as GPTQ does)
        s = int8_channel_scales(W)
        z = torch.zeros_like(s)
        scales, zeros = s[:, None], z[:, None]
        block = config.block_size
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()  # [N, B]
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if gs and col % gs == 0:
                p = _params(W1[:, i:i + gs], bits, config.sym)
                s, z = p.scales, p.zeros
                scales[:, col // gs], zeros[:, col // gs] = s, z
            w_col = W1[:, i]
            q = torch.clamp(torch.round(w_col / s) + z, qmin, qmax)
            Q[:, col] = q.to(Q.dtype)
            err = (w_col - (q - z) * s) / Hinv1[i, i]  # [N]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ Hinv[b0:b1, b1:]
    if not gs and perm is not None:  # per channel: store the columns back in model order
        Q = Q[:, torch.argsort(perm)]
        perm = None
    return GPTQResult(Q, scales, zeros, perm)


def gptq_module(res: GPTQResult, lin: nn.Linear, config: GPTQConfig) -> Int4Linear | Int8Linear:
    dtype = lin.weight.dtype
    if config.bits == 8:
        return Int8Linear.per_channel(res.codes, res.scales[:, 0], lin.bias, dtype)
    assert config.group_size
    return Int4Linear.from_codes(res.codes, res.scales, res.zeros, config.group_size, lin.bias, dtype,
                                 config.bits, res.perm)


class HessianAccumulator:
    """Running H = 2/n sum x x^T over the rows of every input a linear sees."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.h = torch.zeros(k, k, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [rows, K]
        rows = x.shape[0]
        self.h *= self.n / (self.n + rows)
        self.n += rows
        x = x * math.sqrt(2 / self.n)
        self.h += x.t() @ x


def quantize_model(model: nn.Module, config: GPTQConfig, calibration: torch.Tensor | None,
                   progress: bool) -> None:
    from tqdm import tqdm

    assert calibration is not None
    assert config.group_size is not None
    check_layers_fit(model, config, config.group_size, multiple={3: 32, 4: 8, 8: 1}[config.bits])
    layers = decoder_layers(model)
    inputs = capture_first_layer_inputs(model, calibration, config.calib_batch_size)
    prefix = _layers_prefix(model, layers)
    for li, layer in enumerate(tqdm(layers, desc=f"gptq {config.bits}-bit {_groups(config)}",
                                    disable=not progress, unit="layer")):
        linears = {name: mod for name, mod in layer.named_modules()
                   if isinstance(mod, nn.Linear) and not config.skips(f"{prefix}.{li}.{name}")}
        accs = {name: HessianAccumulator(mod.in_features, mod.weight.device) for name, mod in linears.items()}
        handles = [mod.register_forward_hook(lambda _m, args, _o, a=accs[name]: a.add(args[0]))
                   for name, mod in linears.items()]
        try:
            run_layer(layer, inputs)
        finally:
            for h in handles:
                h.remove()
        for name, lin in linears.items():
            res = gptq_quantize_weight(lin.weight, accs[name].h, config)
            set_submodule(layer, name, gptq_module(res, lin, config))
        del accs
        inputs = run_layer(layer, inputs)
    # Linears outside the decoder layers (lm_head unless skipped) are left as they are: GPTQ
    # needs their inputs, and the head is skipped by default anyway.
    log.info("gptq: %d layers quantised", len(layers))


def _groups(config: GPTQConfig) -> str:
    return f"g{config.group_size}" if config.group_size else "per channel"


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    return "model.layers"
