"""Paged attention: the gather reference against per-sequence dense attention, the model's
logits through the paged path against the static-cache path, and the Triton kernel (GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmopt.attention.paged import (
    PagedAttentionBackend,
    build_paged_metadata,
    paged_attention_reference,
)
from llmopt.kv_cache.paged import install_paged_caches
from llmopt.loading.loader import random_model
from llmopt.loading.presets import preset_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_case(device: torch.device, dtype: torch.dtype, qlens: list[int], starts: list[int],
                 num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 32, block_size: int = 16,
                 seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    seq_lens = [s + q for s, q in zip(starts, qlens, strict=True)]
    nblocks = sum(-(-n // block_size) for n in seq_lens) + 3
    perm = torch.randperm(nblocks, generator=g).tolist()  # scattered, out-of-order blocks
    tables, i = [], 0
    for n in seq_lens:
        k = -(-n // block_size)
        tables.append(perm[i:i + k])
        i += k
    kc = torch.randn(nblocks, block_size, num_kv_heads, head_dim, generator=g).to(device, dtype)
    vc = torch.randn(nblocks, block_size, num_kv_heads, head_dim, generator=g).to(device, dtype)
    q = torch.randn(sum(qlens), num_heads, head_dim, generator=g).to(device, dtype)
    return q, kc, vc, tables


def _dense(q, kc, vc, qlens, starts, tables, block_size, window=None):
    """Float64, one sequence at a time, keys gathered position by position."""
    outs, off = [], 0
    group = q.shape[1] // kc.shape[2]
    for qlen, start, table in zip(qlens, starts, tables, strict=True):
        n = start + qlen
        slots = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        k = kc.reshape(-1, *kc.shape[2:])[slots].double().repeat_interleave(group, 1)  # [n, Hq, D]
        v = vc.reshape(-1, *vc.shape[2:])[slots].double().repeat_interleave(group, 1)
        qq = q[off:off + qlen].double()
        qpos = torch.arange(start, n)[:, None]
        mask = torch.arange(n)[None] <= qpos
        if window is not None:
            mask &= qpos - torch.arange(n)[None] < window
        o = F.scaled_dot_product_attention(qq.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask)
        outs.append(o.transpose(0, 1))
        off += qlen
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 5])
def test_gather_reference_matches_dense(window: int | None) -> None:
    qlens, starts = [7, 1, 1, 20, 3], [0, 30, 5, 9, 16]
    dev = torch.device("cpu")
    q, kc, vc, tables = _random_case(dev, torch.float32, qlens, starts)
    meta = build_paged_metadata(qlens, starts, tables, 16, dev, sliding_window=window)
    out = paged_attention_reference(q, kc, vc, meta)
    ref = _dense(q, kc, vc, qlens, starts, tables, 16, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_model_logits_paged_equal_static_cache() -> None:
    """Prefill in two chunks of a paged batch (plus a second sequence), then a decode step,
    against the static-cache path run one sequence at a time."""
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    dev = torch.device("cpu")
    model = random_model(cfg, dev, torch.float32)
    a = torch.randint(3, cfg.vocab_size, (19,)).tolist()
    b = torch.randint(3, cfg.vocab_size, (6,)).tolist()
    bs = 4

    # static path: full logits for every position of each sequence
    ref = {}
    for name, toks in (("a", a), ("b", b)):
        model.setup_caches(1, 64)
        ref[name] = model(torch.tensor([toks]))[0]  # [T, V]
    model.clear_caches()

    install_paged_caches(model, 20, bs, torch.float32, dev)
    model.attention = PagedAttentionBackend()
    model.init_rope(64, dev)
    ta, tb = [3, 7, 1, 12, 5], [9, 0]  # scattered block ids
    # step 1: a[0:11] and b[0:6] together
    meta = build_paged_metadata([11, 6], [0, 0], [ta, tb], bs, dev)
    logits = model(torch.tensor([a[:11] + b]), attn_meta=meta)[0]
    torch.testing.assert_close(logits[:11], ref["a"][:11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[11:], ref["b"], atol=1e-4, rtol=1e-4)
    # step 2: the rest of a's prompt chunk, and b's last token again as a decode-shaped step
    meta = build_paged_metadata([8, 1], [11, 5], [ta, tb], bs, dev)
    logits = model(torch.tensor([a[11:] + b[5:]]), attn_meta=meta)[0]
    torch.testing.assert_close(logits[:8], ref["a"][11:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[8], ref["b"][5], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 40])
def test_triton_kernel_matches_reference(dtype: torch.dtype, window: int | None) -> None:
    from llmopt.attention.paged_triton import paged_attention_triton

    dev = torch.device("cuda")
    qlens, starts = [1, 1, 37, 100, 1, 5], [0, 63, 0, 20, 200, 15]
    for heads, kv_heads, head_dim in ((8, 2, 64), (4, 4, 128)):
        q, kc, vc, tables = _random_case(dev, dtype, qlens, starts, heads, kv_heads, head_dim, seed=3)
        ref_meta = build_paged_metadata(qlens, starts, tables, 16, dev, sliding_window=window)
        tri_meta = build_paged_metadata(qlens, starts, tables, 16, dev, sliding_window=window,
                                        use_triton=True, table_width=32)
        ref = paged_attention_reference(q.float(), kc.float(), vc.float(), ref_meta)
        out = paged_attention_triton(q, kc, vc, tri_meta)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
