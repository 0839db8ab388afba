"""Split-K ("flash-decoding") attention for one query token per sequence, in Triton.

Reads only the filled part of a static KV cache (``lengths`` lives on the device, so one CUDA
graph serves every step), and the query heads of a GQA group share each key/value load. Two
launches: per-split partial softmax, then a log-sum-exp combine across splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import llmopt.kernels


@triton.jit
def _split_kernel(
    Q, K, V, Lengths, O_part, LSE_part,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    num_kv_heads, scale, window,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # a programmatic dependent launch (LLMOPT_KERNEL_PDL): wait for the kernel before
        tl.extra.cuda.gdc_wait()
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads
    length = tl.load(Lengths + b).to(tl.int32)
    first = 0
    if window > 0:
        first = tl.maximum(length - window, 0)
    split_len = tl.cdiv(tl.cdiv(length - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + pid_s * split_len
    hi = tl.minimum(lo + split_len, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_mask = n < hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] float32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if PDL:  # the combine may launch now (it waits on the device for this kernel to finish)
        tl.extra.cuda.gdc_launch_dependents()
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(O_part + b * stride_ob + heads[:, None] * stride_oh + pid_s * stride_os + offs_d[None, :],
             out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(LSE_part + b * stride_lb + heads * stride_lh + pid_s, lse, mask=g_mask)


@triton.jit
def _combine_kernel(
    O_part, LSE_part, Out,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(LSE_part + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_mask & (lse > float("-inf")), tl.exp(lse - m), 0.0)  # [BLOCK_S]
    o = tl.load(O_part + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_outb + h * stride_outh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


def pick_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device,
                    block_n: int = 64) -> int:
    """Enough programs for about two waves of the GPU, never more splits than key blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, -(-2 * sms // (batch * num_kv_heads)))
    return int(max(1, min(want, 64, -(-max_len // block_n))))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int = 0,
    num_splits: int | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D]; k, v: [B, Hkv, S, D] (last dim contiguous); lengths: [B] keys to read.

    Returns [B, Hq, D]. Keys at positions >= lengths[b] (and < lengths[b] - window) are ignored.
    ``pdl``: both launches programmatic dependent ones (default: LLMOPT_KERNEL_PDL).
    """
    pdl = llmopt.kernels.KERNEL_PDL if pdl is None else pdl
    launch = {"PDL": True, "launch_pdl": True} if pdl else {}
    bsz, num_heads, head_dim = q.shape
    num_kv_heads, max_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    if num_splits is None:
        num_splits = pick_num_splits(bsz, num_kv_heads, max_len, q.device)
    o_part = torch.empty(bsz, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(bsz, num_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(head_dim)
    block_g = max(16, triton.next_power_of_2(group))
    _split_kernel[(bsz * num_kv_heads, num_splits)](
        q, k, v, lengths, o_part, lse_part,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        num_kv_heads, scale, window,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=64,
        NUM_SPLITS=num_splits, num_warps=4, num_stages=2,
        # float32 caches get full-precision dots (Triton would use tf32 otherwise)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **launch,
    )
    _combine_kernel[(bsz * num_heads,)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        num_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, **launch,
    )
    return out


@torch.library.custom_op("llmopt::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float, window: int
) -> torch.Tensor:
    return decode_attention(q, k, v, lengths, scale, window)


@decode_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
      window: int) -> torch.Tensor:
    return torch.empty_like(q)


def reference_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Plain float32 PyTorch: the same function, for tests."""
    bsz, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    vv = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("bhd,bhsd->bhs", q.float(), kk) * scale
    pos = torch.arange(k.shape[2], device=q.device)[None, :]
    keep = pos < lengths[:, None]
    if window > 0:
        keep &= pos >= (lengths[:, None] - window)
    s = s.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), vv).to(q.dtype)
