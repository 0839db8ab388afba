"""Paged attention over a flat token batch (continuous batching).

The batch is one row of N tokens from B sequences, each a run of new tokens (a prefill chunk or
one decode token) whose keys join that sequence's cached ones. Keys live in a block pool
[num_blocks, block_size, num_kv_heads, head_dim] addressed through per-sequence block tables.

Two implementations behind one backend:
- a gather path in plain PyTorch (any device; the reference): gather each sequence's blocks,
  pad queries per sequence, one SDPA call with a position mask;
- a Triton kernel on CUDA (``attention/paged_triton.py``, imported only there), reading blocks
  in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmopt.attention.base import AttentionMetadata, register_backend


@dataclass
class PagedAttentionMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor = None  # type: ignore[assignment]  # [N] int64 pool slot per token
    block_tables: torch.Tensor = None  # type: ignore[assignment]  # [B, max_blocks] int32
    seq_lens: torch.Tensor = None  # type: ignore[assignment]  # [B] int32 keys after this step
    query_start_loc: torch.Tensor = None  # type: ignore[assignment]  # [B+1] int32
    max_query_len: int = 1
    max_seq_len: int = 1
    sliding_window: int | None = None
    use_triton: bool = False
    # Gather path only (None when the Triton kernel runs):
    gather_slots: torch.Tensor | None = None  # [B, L] pool slot of each key
    query_index: torch.Tensor | None = None  # [B, Tq] flat token index (N = padding)
    token_seq: torch.Tensor | None = None  # [N] sequence of each token
    token_offset: torch.Tensor | None = None  # [N] index of each token within its sequence
    gather_mask: torch.Tensor | None = None  # [B, 1, Tq, L] bool, True = attend


def build_paged_metadata(
    query_lens: list[int],
    start_positions: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    sliding_window: int | None = None,
    use_triton: bool = False,
    table_width: int | None = None,
) -> PagedAttentionMetadata:
    """Metadata for sequences that run ``query_lens[b]`` new tokens starting at
    ``start_positions[b]``; built on the host, copied to ``device`` once."""
    num_seqs = len(query_lens)
    positions: list[int] = []
    slots: list[int] = []
    for qlen, start, table in zip(query_lens, start_positions, block_tables, strict=True):
        for p in range(start, start + qlen):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    seq_lens = [s + q for s, q in zip(start_positions, query_lens, strict=True)]
    width = table_width or max(len(t) for t in block_tables)
    tables = torch.zeros(num_seqs, width, dtype=torch.int32)
    for b, t in enumerate(block_tables):
        tables[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    nb = device.type != "cpu"
    pos_t = torch.tensor(positions, dtype=torch.long)
    meta = PagedAttentionMetadata(
        positions=pos_t[None].to(device, non_blocking=nb),
        key_positions=pos_t[None].to(device, non_blocking=nb),
        mask=None,
        kv_len=None,
        slot_mapping=torch.tensor(slots, dtype=torch.long).to(device, non_blocking=nb),
        block_tables=tables.to(device, non_blocking=nb),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=nb),
        query_start_loc=torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=nb),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        sliding_window=sliding_window,
        use_triton=use_triton,
    )
    if not use_triton:
        _add_gather_inputs(meta, query_lens, start_positions, block_tables, block_size, device)
    return meta


def _add_gather_inputs(
    meta: PagedAttentionMetadata,
    query_lens: list[int],
    start_positions: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> None:
    num_seqs = len(query_lens)
    n = sum(query_lens)
    max_q, max_k = meta.max_query_len, meta.max_seq_len
    nblk = -(-max_k // block_size)
    tables = torch.zeros(num_seqs, nblk, dtype=torch.long)
    for b, t in enumerate(block_tables):
        k = min(len(t), nblk)
        tables[b, :k] = torch.tensor(t[:k], dtype=torch.long)
    offs = torch.arange(block_size)
    gather = (tables[:, :, None] * block_size + offs).reshape(num_seqs, -1)[:, :max_k]  # [B, L]
    qlens = torch.tensor(query_lens)
    starts = torch.tensor(start_positions)
    t_idx = torch.arange(max_q)
    cum = torch.cumsum(qlens, 0) - qlens  # [B] first flat index of each sequence
    qindex = torch.where(t_idx[None] < qlens[:, None], cum[:, None] + t_idx[None], n)  # [B, Tq]
    qpos = starts[:, None] + t_idx[None]  # [B, Tq]; padded rows see every key, so never NaN
    kpos = torch.arange(max_k)
    mask = (kpos[None, None] <= qpos[:, :, None]) & (kpos[None, None] < (starts + qlens)[:, None, None])
    if meta.sliding_window is not None:
        mask &= qpos[:, :, None] - kpos[None, None] < meta.sliding_window
    token_seq = torch.repeat_interleave(torch.arange(num_seqs), qlens)  # [N]
    token_offset = torch.arange(n) - cum[token_seq]
    nb = device.type != "cpu"
    meta.gather_slots = gather.to(device, non_blocking=nb)
    meta.query_index = qindex.to(device, non_blocking=nb)
    meta.token_seq = token_seq.to(device, non_blocking=nb)
    meta.token_offset = token_offset.to(device, non_blocking=nb)
    meta.gather_mask = mask[:, None].to(device, non_blocking=nb)


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata
) -> torch.Tensor:
    """q: [N, Hq, D] flat queries; caches: [num_blocks, block_size, Hkv, D]. Returns [N, Hq, D]."""
    assert meta.gather_slots is not None and meta.query_index is not None
    assert meta.gather_mask is not None and meta.token_seq is not None and meta.token_offset is not None
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = k_cache.view(-1, num_kv_heads, head_dim)[meta.gather_slots].transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.view(-1, num_kv_heads, head_dim)[meta.gather_slots].transpose(1, 2)
    qpad = torch.cat([q, q.new_zeros(1, num_heads, head_dim)])[meta.query_index]  # [B, Tq, Hq, D]
    bsz, tq = meta.query_index.shape
    # The query heads sharing a KV head fold into the query axis: keys are read once per group.
    qg = qpad.permute(0, 2, 1, 3).reshape(bsz, num_kv_heads, group * tq, head_dim)  # [B, Hkv, G*Tq, D]
    mask = meta.gather_mask.expand(bsz, group, tq, -1).reshape(bsz, 1, group * tq, -1)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # [B, Hkv, G*Tq, D]
    out = out.reshape(bsz, num_heads, tq, head_dim).transpose(1, 2)  # [B, Tq, Hq, D]
    return out[meta.token_seq, meta.token_offset]  # [N, Hq, D]


class PagedAttentionBackend:
    name = "paged"

    def prepare(
        self,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
        kv_len: int | None,
        sliding_window: int | None,
    ) -> AttentionMetadata:
        raise RuntimeError("paged attention metadata is built by the model runner (attn_meta=...)")

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [1, Hq, N, D]; k, v: the layer's pools [num_blocks, block_size, Hkv, D]
        assert isinstance(meta, PagedAttentionMetadata)
        qf = q[0].transpose(0, 1)  # [N, Hq, D]
        if meta.use_triton:
            from llmopt.attention.paged_triton import paged_attention_triton

            out = paged_attention_triton(qf.contiguous(), k, v, meta)
        else:
            out = paged_attention_reference(qf, k, v, meta)
        return out.transpose(0, 1)[None]  # [1, Hq, N, D]


@register_backend("paged")
def _make() -> PagedAttentionBackend:
    return PagedAttentionBackend()
