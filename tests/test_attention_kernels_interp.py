"""The Triton attention kernels (split-K decode over a static cache; paged attention) on CPU
through Triton's interpreter, against their plain-PyTorch references: their arithmetic is then
checked where there is no GPU (the GPU tests cover speed-relevant paths and dtypes there).
Skipped without triton."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_triton_script

_SCRIPT = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from llmopt.kernels.decode_attention import decode_attention, reference_decode_attention
from llmopt.attention.paged import build_paged_metadata, paged_attention_reference
from llmopt.attention.paged_triton import paged_attention_triton
from test_paged_attention import _random_case

torch.manual_seed(0)
worst = {}
# decode: GQA and MHA, a sliding window, ragged lengths, several splits
for bsz, hq, hkv, d, max_len, window, splits in [(2, 8, 2, 64, 150, 0, 3), (3, 4, 4, 32, 90, 20, 2)]:
    q = torch.randn(bsz, hq, d)
    k = torch.randn(bsz, hkv, max_len, d)
    v = torch.randn(bsz, hkv, max_len, d)
    lengths = torch.randint(1, max_len + 1, (bsz,))
    lengths[0] = max_len
    out = decode_attention(q, k, v, lengths, d ** -0.5, window, num_splits=splits)
    ref = reference_decode_attention(q, k, v, lengths, d ** -0.5, window)
    worst["decode"] = max(worst.get("decode", 0.0), (out - ref).abs().max().item())
# paged: prefill chunks and decode rows in one batch, with and without a window
dev = torch.device("cpu")
qlens, starts = [1, 37, 5, 1], [0, 20, 15, 70]
for window in (None, 24):
    q, kc, vc, tables = _random_case(dev, torch.float32, qlens, starts, 4, 2, 32, seed=3)
    ref_meta = build_paged_metadata(qlens, starts, tables, 16, dev, sliding_window=window)
    tri_meta = build_paged_metadata(qlens, starts, tables, 16, dev, sliding_window=window,
                                    use_triton=True, table_width=8)
    ref = paged_attention_reference(q, kc, vc, ref_meta)
    out = paged_attention_triton(q, kc, vc, tri_meta)
    worst["paged"] = max(worst.get("paged", 0.0), (out - ref).abs().max().item())
print(worst)
assert all(e < 1e-4 for e in worst.values()), worst
'''


def test_attention_kernels_under_the_interpreter(tmp_path: Path) -> None:
    run_triton_script(_SCRIPT, tmp_path, interpret=True)


_PDL_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmopt.kernels import decode_attention as A

C = "constexpr"
split_sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Lengths": "*i32", "O_part": "*fp32", "LSE_part": "*fp32",
             **{f"stride_{n}": "i32" for n in ("qb", "qh", "kb", "kh", "ks", "vb", "vh", "vs", "ob", "oh", "os",
                                                "lb", "lh")},
             "num_kv_heads": "i32", "scale": "fp32", "window": "i32", "GROUP": C, "BLOCK_G": C, "HEAD_DIM": C,
             "BLOCK_D": C, "BLOCK_N": C, "NUM_SPLITS": C, "PRECISION": C, "PDL": C}
combine_sig = {"O_part": "*fp32", "LSE_part": "*fp32", "Out": "*bf16",
               **{f"stride_{n}": "i32" for n in ("ob", "oh", "os", "lb", "lh", "outb", "outh")},
               "num_heads": "i32", "HEAD_DIM": C, "BLOCK_D": C, "NUM_SPLITS": C, "BLOCK_S": C, "PDL": C}
marks = {}
for pdl in (False, True):
    for kern, sig, consts in (
            (A._split_kernel, split_sig, {"GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "BLOCK_D": 128,
                                          "BLOCK_N": 64, "NUM_SPLITS": 8, "PRECISION": "tf32", "PDL": pdl}),
            (A._combine_kernel, combine_sig, {"HEAD_DIM": 128, "BLOCK_D": 128, "NUM_SPLITS": 8, "BLOCK_S": 8,
                                              "PDL": pdl})):
        ptx = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts),
                             target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        marks[(kern.__name__, pdl)] = ("griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx)
print(marks)
assert all(m == (pdl, pdl) for (_, pdl), m in marks.items()), marks
'''


def test_decode_attention_pdl_compiles_for_hopper(tmp_path: Path) -> None:
    """LLMOPT_KERNEL_PDL: both decode-attention kernels compile for sm_90 (no GPU needed), and
    their PTX waits on and releases the grid dependency exactly when PDL is on."""
    run_triton_script(_PDL_COMPILE_SCRIPT, tmp_path, interpret=False)
