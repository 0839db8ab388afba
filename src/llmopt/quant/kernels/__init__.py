"""Weight-only quantised matmuls: one function per format, dispatching by device and batch.

- CPU (any batch): the plain-PyTorch path in ``reference.py`` (dequantise, or scale after the
  matmul where that is exact).
- CUDA, at most ``SMALL_M`` rows (decode, batch 1..16): the fused Triton dequantise-and-matmul in
  ``triton_wo.py``; it reads the packed weight once, which is what makes decode bandwidth-bound
  on fewer bytes.
- CUDA, more rows (prefill): dequantise to the activation dtype and use cuBLAS. The dequantise is
  paid once per call and is small next to an M x N x K matmul with large M.
- FP8 with ``mode="scaled_mm"``: activations quantised per row to e4m3 and ``torch._scaled_mm``
  (H100 FP8 tensor cores) at any batch.

Triton is imported only when a CUDA tensor reaches a Triton path, so the CPU paths never need it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from llmopt.quant.kernels import reference as ref

SMALL_M = 16


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    # float32 activations would make tl.dot run in tf32: keep those on the exact path.
    return (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and _have_triton()
            and x.numel() // x.shape[-1] <= SMALL_M)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import int8_matmul

        y = int8_matmul(x, qweight, scales)
        return y if bias is None else y + bias
    return ref.int8_linear_ref(x, qweight, scales, bias)


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import int4_matmul

        y = int4_matmul(x, qweight, scales, zeros, group_size)
        return y if bias is None else y + bias
    return ref.int4_linear_ref(x, qweight, scales, zeros, group_size, bias)


def nf4_linear(
    x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import nf4_matmul

        y = nf4_matmul(x, qweight, absmax, block_size)
        return y if bias is None else y + bias
    return ref.nf4_linear_ref(x, qweight, absmax, block_size, bias)


def fp8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    mode: str = "dequant",
) -> torch.Tensor:
    if x.device.type == "cuda" and mode == "scaled_mm":
        from llmopt.quant.kernels.fp8_scaled_mm import fp8_scaled_mm

        y = fp8_scaled_mm(x, qweight, scales)
        return y if bias is None else y + bias
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import fp8_matmul

        y = fp8_matmul(x, qweight, scales)
        return y if bias is None else y + bias
    return ref.fp8_linear_ref(x, qweight, scales, bias)
