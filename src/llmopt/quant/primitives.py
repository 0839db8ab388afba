"""Pure quantisation maths: no modules, no formats on disk, no devices named.

Conventions. A linear weight is ``[N, K]`` (out_features, in_features), as in ``nn.Linear``.
Group-wise parameters are ``[N, G]`` with ``G = ceil(K / group_size)``: a layer whose K is not a
multiple of the group size gets a shorter last group (the AutoGPTQ convention, ``scales`` has
``ceil(K / g)`` rows), which is what lets g128 run on a 576-wide model.
Packing is a little-endian bit stream along dim 0 in chunks of 32 values, so 4-bit packs 8 values
per int32 word (value ``i`` at bits ``4i``) and 3-bit packs 32 values into 3 words: both are the
Hugging Face GPTQ ``qweight`` layouts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

FP8_E4M3_MAX = 448.0


# -- int8: symmetric per output channel -----------------------------------------------------------
class Int8Weights(NamedTuple):
    qweight: torch.Tensor  # [N, K] int8 in [-127, 127]
    scales: torch.Tensor  # [N] float32


def int8_channel_scales(w: torch.Tensor) -> torch.Tensor:
    """One symmetric scale per output channel [N] (float32) for codes in [-127, 127]: -128 is
    left out so the range is symmetric and negating a weight is exact."""
    return (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-10)


def quantize_int8_per_channel(w: torch.Tensor) -> Int8Weights:
    w32 = w.float()
    scales = int8_channel_scales(w32)  # [N]
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weights(q, scales)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


# -- group-wise asymmetric (int4, int3 for GPTQ) ---------------------------------------------------
def num_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)


def _grouped(w: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """[N, K] -> [N, G, group_size], padding a ragged last group with ``fill``."""
    n, k = w.shape
    g = num_groups(k, group_size)
    if g * group_size != k:
        w = torch.nn.functional.pad(w, (0, g * group_size - k), value=fill)
    return w.reshape(n, g, group_size)


def expand_groups(p: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Per-group parameters [N, G] -> per-weight [N, K]."""
    return p.repeat_interleave(group_size, dim=1)[:, :k]


class GroupParams(NamedTuple):
    scales: torch.Tensor  # [N, G] float32
    zeros: torch.Tensor  # [N, G] float32 holding integers in [0, 2**bits - 1]


def minmax_params(wmin: torch.Tensor, wmax: torch.Tensor, bits: int) -> GroupParams:
    """Asymmetric scale and integer zero point from a range. The range is widened to include 0 so
    that 0 is exactly representable and the zero point never needs clamping."""
    qmax = 2**bits - 1
    wmin = wmin.float().clamp(max=0.0)
    wmax = wmax.float().clamp(min=0.0)
    scales = ((wmax - wmin) / qmax).clamp(min=1e-10)
    zeros = torch.round(-wmin / scales).clamp(0, qmax)
    return GroupParams(scales, zeros)


def group_minmax_params(w: torch.Tensor, bits: int, group_size: int) -> GroupParams:
    wmin = _grouped(w.float(), group_size, math.inf).amin(dim=2)  # [N, G]
    wmax = _grouped(w.float(), group_size, -math.inf).amax(dim=2)
    return minmax_params(wmin, wmax, bits)


def quantize_with_params(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """Round ``w`` with per-weight (broadcastable) scales and zeros -> uint8 codes."""
    q = torch.round(w.float() / scales) + zeros
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def quantize_groupwise(w: torch.Tensor, params: GroupParams, bits: int, group_size: int) -> torch.Tensor:
    k = w.shape[1]
    s = expand_groups(params.scales, group_size, k)
    z = expand_groups(params.zeros, group_size, k)
    return quantize_with_params(w, s, z, bits)  # [N, K] uint8


def dequantize_groupwise(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes [N, K] with parameters [N, G] -> weights [N, K]. ``g_idx`` [K] (act-order GPTQ) gives
    each input channel's group; by default channel k is in group k // group_size."""
    k = q.shape[1]
    if g_idx is None:
        s = expand_groups(scales.float(), group_size, k)
        z = expand_groups(zeros.float(), group_size, k)
    else:
        s = scales.float()[:, g_idx.long()]
        z = zeros.float()[:, g_idx.long()]
    return ((q.float() - z) * s).to(dtype)


# -- NF4 (QLoRA) -------------------------------------------------------------------------------------
def nf4_codebook() -> torch.Tensor:
    """The 16 NormalFloat-4 levels, derived as in the QLoRA paper: quantiles of N(0, 1) at evenly
    spaced probabilities, 8 for the positive half and 7 for the negative half plus an exact zero,
    normalised to [-1, 1]. The outermost probability 0.9677 = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
    keeps the extreme quantile finite."""
    offset = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()  # [16] ascending, levels[7] == 0


class NF4Weights(NamedTuple):
    codes: torch.Tensor  # [N, K] uint8 in [0, 15]
    absmax: torch.Tensor  # [N, G] float32


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> NF4Weights:
    """Block-wise absmax along K (each output channel's K weights in blocks of ``block_size``;
    with K a multiple of the block this is bitsandbytes' flat blocking of the row-major weight)."""
    k = w.shape[1]
    absmax = _grouped(w.float().abs(), block_size, 0.0).amax(dim=2).clamp(min=1e-10)  # [N, G]
    x = w.float() / expand_groups(absmax, block_size, k)  # in [-1, 1]
    book = nf4_codebook().to(w.device)
    mids = (book[1:] + book[:-1]) / 2  # nearest level = number of midpoints below x
    codes = torch.bucketize(x, mids).to(torch.uint8)
    return NF4Weights(codes, absmax)


def dequantize_nf4(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    book = nf4_codebook().to(codes.device)
    k = codes.shape[1]
    return (book[codes.long()] * expand_groups(absmax.float(), block_size, k)).to(dtype)


class DoubleQuant(NamedTuple):
    codes: torch.Tensor  # same shape as the absmax it replaces, int8
    scales: torch.Tensor  # [ceil(numel / block)] float32
    offset: torch.Tensor  # [] float32: the mean subtracted before quantising (absmax is > 0)


def double_quantize(absmax: torch.Tensor, block_size: int = 256) -> DoubleQuant:
    """QLoRA's second quantisation: the (positive) block scales minus their mean, in int8 with one
    float32 scale per ``block_size`` consecutive scales."""
    flat = absmax.float().flatten()
    offset = flat.mean()
    centred = flat - offset
    n = flat.numel()
    nb = math.ceil(n / block_size)
    padded = torch.nn.functional.pad(centred, (0, nb * block_size - n)).view(nb, block_size)
    scales = (padded.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [nb]
    codes = torch.round(padded / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return DoubleQuant(codes.flatten()[:n].view(absmax.shape), scales, offset)


def double_dequantize(dq: DoubleQuant, block_size: int = 256) -> torch.Tensor:
    flat = dq.codes.flatten().float()
    s = dq.scales.float().repeat_interleave(block_size)[: flat.numel()]
    return (flat * s + dq.offset.float()).view(dq.codes.shape)


# -- FP8 e4m3 per output channel -----------------------------------------------------------------
class FP8Weights(NamedTuple):
    qweight: torch.Tensor  # [N, K] float8_e4m3fn
    scales: torch.Tensor  # [N] float32


def quantize_fp8_per_channel(w: torch.Tensor) -> FP8Weights:
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / FP8_E4M3_MAX).clamp(min=1e-12)  # [N]
    q = (w32 / scales[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8Weights(q, scales)


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


# -- bit packing ---------------------------------------------------------------------------------
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, ...] (each < 2**bits) -> int32 [K * bits / 32, ...]: a little-endian bit stream
    along dim 0, 32 values to ``bits`` words. K must be a multiple of 32 / gcd(32, bits)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    k = values.shape[0]
    per = 32 // math.gcd(32, bits)  # values per whole number of words
    if k % per:
        raise ValueError(f"cannot pack {k} values of {bits} bits into whole int32 words")
    rest = values.shape[1:]
    chunk = per
    nwords = chunk * bits // 32
    v = values.to(torch.int64).reshape(k // chunk, chunk, *rest)
    words = torch.zeros((k // chunk, nwords, *rest), dtype=torch.int64, device=values.device)
    for i in range(chunk):
        pos = i * bits
        w, off = divmod(pos, 32)
        words[:, w] |= v[:, i] << off
        if off + bits > 32:  # the value straddles two words (3-bit)
            words[:, w + 1] |= v[:, i] >> (32 - off)
    return _to_int32(words.reshape(k // chunk * nwords, *rest))


def unpack_bits(packed: torch.Tensor, bits: int, k: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 [K * bits / 32, ...] -> uint8 codes [K, ...]."""
    per = 32 // math.gcd(32, bits)
    nwords = per * bits // 32
    rest = packed.shape[1:]
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(rows // nwords, nwords, *rest)
    mask = 2**bits - 1
    out = torch.empty((rows // nwords, per, *rest), dtype=torch.int64, device=packed.device)
    for i in range(per):
        pos = i * bits
        w, off = divmod(pos, 32)
        val = words[:, w] >> off
        if off + bits > 32:
            val = val | (words[:, w + 1] << (32 - off))
        out[:, i] = val & mask
    out = out.reshape(rows // nwords * per, *rest).to(torch.uint8)
    return out if k is None else out[:k]


# AutoAWQ packs 8 output channels per int32 in this interleaved order (nibble i holds channel
# AWQ_ORDER[i] of the 8), matching the register layout of its GEMM kernel.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes [R, N] -> int32 [R, N / 8], packed along N in AutoAWQ's interleaved order."""
    r, n = values.shape
    order = torch.tensor(AWQ_ORDER, device=values.device)
    perm = (torch.arange(0, n, 8, device=values.device)[:, None] + order[None, :]).flatten()
    return pack_bits(values[:, perm].T.contiguous(), 4).T.contiguous()


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    r, n8 = packed.shape
    vals = unpack_bits(packed.T.contiguous(), 4).T  # [R, N] in packed order
    order = torch.tensor(AWQ_ORDER, device=packed.device)
    perm = (torch.arange(0, n8 * 8, 8, device=packed.device)[:, None] + order[None, :]).flatten()
    out = torch.empty_like(vals)
    out[:, perm] = vals
    return out
