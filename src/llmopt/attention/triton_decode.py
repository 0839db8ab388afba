"""Decode attention through the split-K Triton kernel (GPU); prefill falls back to SDPA.

The kernel reads each sequence's keys up to its own length, taken from the positions tensor on
the device, so the decode step has static shapes and no host sync.
"""

from __future__ import annotations

import torch

from llmopt.attention.base import AttentionMetadata, register_backend
from llmopt.attention.sdpa import SdpaBackend


class TritonDecodeBackend(SdpaBackend):
    name = "triton"

    def __init__(self) -> None:
        self._window = 0

    def prepare(
        self,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
        kv_len: int | None,
        sliding_window: int | None,
    ) -> AttentionMetadata:
        if positions.shape[1] != 1 or positions.device.type != "cuda" or key_positions.dim() != 1:
            return super().prepare(positions, key_positions, kv_len, sliding_window)
        self._window = sliding_window or 0
        return AttentionMetadata(positions, key_positions, None, None)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if meta.mask is not None:
            return super().__call__(q, k, v, meta)
        from llmopt.kernels.decode_attention import decode_attention_op

        lengths = meta.positions[:, 0] + 1  # [B] keys filled, this step's included
        scale = q.shape[-1] ** -0.5
        out = decode_attention_op(q[:, :, 0], k, v, lengths, scale, self._window)  # [B, Hq, D]
        return out[:, :, None]


@register_backend("triton")
def _make() -> TritonDecodeBackend:
    return TritonDecodeBackend()
