"""Attention through ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask.

Grouped-query attention never materialises repeated KV heads: the query heads that share a KV
head are folded into the query-length axis, so one SDPA call per KV head group reads each key once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmopt.attention.base import AttentionMetadata, register_backend


def build_mask(
    positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    kp = key_positions if key_positions.dim() == 2 else key_positions[None]  # [B or 1, S]
    mask = kp[:, None, :] <= positions[:, :, None]  # [B, T, S]
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - kp[:, None, :] < sliding_window)
    return mask[:, None]  # [B, 1, T, S]


class SdpaBackend:
    name = "sdpa"

    def prepare(
        self,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
        kv_len: int | None,
        sliding_window: int | None,
    ) -> AttentionMetadata:
        if kv_len is not None:
            key_positions = key_positions[..., :kv_len]
        mask = build_mask(positions, key_positions, sliding_window)
        return AttentionMetadata(positions, key_positions, mask, kv_len)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]
        if meta.kv_len is not None:
            k, v = k[:, :, : meta.kv_len], v[:, :, : meta.kv_len]
        bsz, num_heads, seq, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        mask = meta.mask
        if group > 1:
            q = q.reshape(bsz, num_kv_heads, group * seq, head_dim)  # [B, Hkv, G*T, D]
            assert mask is not None
            mask = mask.expand(bsz, group, seq, mask.shape[-1]).reshape(bsz, 1, group * seq, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.reshape(bsz, num_heads, seq, head_dim)


@register_backend("sdpa")
def _make() -> SdpaBackend:
    return SdpaBackend()
