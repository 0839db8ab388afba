"""Plain-PyTorch weight-only matmuls: the CPU path of every format and the reference every GPU
kernel is tested against. All take x [..., K] and return [..., N] in x's dtype.

Packed layouts (shared with the Triton kernels): ``qweight`` int32 [K/8, N] holds 4-bit codes
packed along K (8 per word, code of row k at bits 4*(k % 8)); per-group parameters are [G, N]
with channel k in group k // group_size (a ragged last group is allowed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmopt.quant.primitives import expand_groups, nf4_codebook, unpack_bits


def unpack_int4_kn(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [K/8, N] -> codes [K, N] (uint8)."""
    return unpack_bits(qweight, 4, k)


def dequant_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qweight.to(torch.float32) * scales.float()[:, None]).to(dtype)  # [N, K]


def int8_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    # int8 codes are exact in any float dtype, so the per-channel scale can move after the matmul:
    # x @ (q * s)^T == (x @ q^T) * s. On CPU this beats both dequantise-first and
    # torch._weight_int8pack_mm (14x slower than this for a 1024-token prefill, measured on the
    # 2-core dev box with torch 2.13).
    y = F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)
    return y if bias is None else y + bias


def dequant_int8g(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Group-wise asymmetric int8: qweight [N, K], scales/zeros [G, N] -> weight [N, K]."""
    n, k = qweight.shape
    if k % group_size == 0:  # whole groups: broadcast over a [N, G, group] view, no gather
        q = qweight.view(n, k // group_size, group_size).to(dtype)
        w = (q - zeros.t().to(dtype)[:, :, None]) * scales.t().to(dtype)[:, :, None]
        return w.view(n, k)
    w = ((qweight.to(torch.float32) - expand_groups(zeros.float().t(), group_size, k))
         * expand_groups(scales.float().t(), group_size, k))  # [N, K]
    return w.to(dtype)


def int8g_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return F.linear(x, dequant_int8g(qweight, scales, zeros, group_size, x.dtype), bias)


def dequant_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """-> weight [N, K] in ``dtype``."""
    q = unpack_int4_kn(qweight, k).to(torch.float32)  # [K, N]
    g = torch.arange(k, device=q.device) // group_size  # [K]
    w = (q - zeros.float()[g]) * scales.float()[g]  # [K, N]
    return w.t().to(dtype)


def int4_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    k = x.shape[-1]
    return F.linear(x, dequant_int4(qweight, scales, zeros, group_size, k, x.dtype), bias)


def dequant_nf4(
    qweight: torch.Tensor, absmax: torch.Tensor, block_size: int, k: int, dtype: torch.dtype,
    lut: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lut``: the 16 NF4 levels on qweight's device, if the caller holds them (NF4Linear's
    buffer); otherwise they are derived here."""
    codes = unpack_int4_kn(qweight, k).long()  # [K, N]
    book = nf4_codebook().to(qweight.device) if lut is None else lut
    g = torch.arange(k, device=codes.device) // block_size
    return (book[codes] * absmax.float()[g]).t().to(dtype)  # [N, K]


def nf4_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, lut: torch.Tensor | None = None,
) -> torch.Tensor:
    k = x.shape[-1]
    return F.linear(x, dequant_nf4(qweight, absmax, block_size, k, x.dtype, lut), bias)


def fp8_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    # e4m3 values are exact in bf16/fp16/fp32, so as for int8 the scale is applied after.
    y = F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)
    return y if bias is None else y + bias
