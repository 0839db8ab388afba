"""A pre-allocated KV cache written by position (static shapes, so decode can be graph-captured)."""

from __future__ import annotations

import torch
from torch import nn

from llmopt.attention.base import AttentionMetadata


class StaticKVCache(nn.Module):
    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at their positions; return what attention reads."""
        # k, v: [B, Hkv, T, D]; meta.positions: [B, T]
        positions = meta.positions
        bsz = k.shape[0]
        rows = torch.arange(bsz, device=positions.device)[:, None]  # [B, 1]
        # Advanced indices split by a slice put the indexed dims first: [B, T, Hkv, D].
        self.k_cache[rows, :, positions] = k.transpose(1, 2)
        self.v_cache[rows, :, positions] = v.transpose(1, 2)
        return self.k_cache[:bsz], self.v_cache[:bsz]
