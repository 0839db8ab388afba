"""The paged KV pool: per layer, keys and values in blocks [num_blocks, block_size, Hkv, D].

A layer's cache module writes this step's keys and values at their slots (block id * block
size + offset, from the block manager's tables) and hands the whole pool to paged attention.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.attention.base import AttentionMetadata


class PagedKVCache(nn.Module):
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [1, Hkv, N, D]; meta.slot_mapping: [N]
        slots = meta.slot_mapping  # type: ignore[attr-defined]
        _, num_kv_heads, _, head_dim = k.shape
        self.k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[0].transpose(0, 1))
        self.v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[0].transpose(0, 1))
        return self.k_cache, self.v_cache


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def install_paged_caches(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                         device: torch.device) -> list[PagedKVCache]:
    """Give every attention layer of ``model`` its paged pool (replacing any static cache)."""
    c = model.config  # type: ignore[attr-defined]
    caches = []
    for layer in model.model.layers:  # type: ignore[attr-defined]
        # the module's own head count: a tensor-parallel rank holds only some KV heads
        cache = PagedKVCache(num_blocks, block_size, layer.self_attn.num_kv_heads, c.head_dim, dtype,
                             device)
        layer.self_attn.kv_cache = cache
        caches.append(cache)
    return caches
