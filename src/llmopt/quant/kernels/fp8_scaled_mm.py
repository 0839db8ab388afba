"""FP8 x FP8 through ``torch._scaled_mm`` (H100 tensor cores): activations are quantised to e4m3
per row on the fly, the weight is already e4m3 with one scale per output channel."""

from __future__ import annotations

import torch

from llmopt.quant.primitives import FP8_E4M3_MAX


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)  # [M, 1]
    scale = amax / FP8_E4M3_MAX
    q = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_scaled_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ (qweight [N, K] e4m3 * scales [N]).T -> [..., N] in x.dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    # cuBLASLt wants the row count padded to a multiple of 16 for FP8.
    pad = (-m) % 16
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    xq, xs = quantize_rows_fp8(x2)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(
        xq, qweight.t(), scale_a=xs, scale_b=scales.float().view(1, -1), out_dtype=out_dtype
    )  # [M + pad, N]
    return y[:m].to(x.dtype).reshape(*lead, -1)
