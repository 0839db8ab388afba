"""Triton paged attention for a flat batch of variable-length query runs (CUDA only).

One program handles one sequence, one query head and a tile of up to BLOCK_M of its new tokens;
it walks the sequence's block table one KV block at a time with an online softmax, so keys are
read in place from the pool. Decode (one token per sequence) is the same kernel with one tile.
The plain-PyTorch reference is ``attention.paged.paged_attention_reference``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmopt.attention.paged import PagedAttentionMetadata


@triton.jit
def _paged_attention_kernel(
    Q, K, V, Out,
    block_tables, seq_lens, query_start_loc,
    scale,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_on, stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    mblk = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    kv_len = tl.load(seq_lens + seq)
    ctx = kv_len - q_len  # keys cached before this step's tokens

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_s = tl.arange(0, BLOCK_SIZE)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qn + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, D]
    q_pos = ctx + offs_m
    kv_head = head // GROUP

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # Keys after this tile's last query are all masked, so the walk stops there.
    hi = tl.minimum(kv_len, ctx + (mblk + 1) * BLOCK_M)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(ctx + mblk * BLOCK_M - WINDOW + 1, 0) // BLOCK_SIZE
    for kb in range(lo, tl.cdiv(hi, BLOCK_SIZE)):
        phys = tl.load(block_tables + seq * stride_bt + kb).to(tl.int64)
        k = tl.load(K + phys * stride_kb + offs_s[:, None] * stride_ks + kv_head * stride_kh
                    + offs_d[None, :], mask=d_mask[None, :], other=0.0)  # [BLOCK_SIZE, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_SIZE] float32
        k_pos = kb * BLOCK_SIZE + offs_s
        valid = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len)
        if WINDOW > 0:
            valid = valid & (q_pos[:, None] - k_pos[None, :] < WINDOW)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key masked so far keeps -inf; subtracting 0 avoids inf - inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + phys * stride_vb + offs_s[:, None] * stride_vs + kv_head * stride_vh
                    + offs_d[None, :], mask=d_mask[None, :], other=0.0)  # [BLOCK_SIZE, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_on + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata
) -> torch.Tensor:
    """q: [N, Hq, D] (contiguous); caches: [num_blocks, block_size, Hkv, D]. Returns [N, Hq, D]."""
    n, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton paged kernel needs a power-of-two block size >= 16, got {block_size}")
    out = torch.empty_like(q)
    num_seqs = meta.seq_lens.shape[0]
    block_m = 16 if meta.max_query_len <= 16 else 64
    grid = (num_seqs, num_heads, triton.cdiv(meta.max_query_len, block_m))
    tables = meta.block_tables
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        tables, meta.seq_lens, meta.query_start_loc,
        1.0 / math.sqrt(head_dim),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        WINDOW=meta.sliding_window or 0,
        # float32 caches (tests, references) must not silently drop to TF32 precision
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
    )
    return out
